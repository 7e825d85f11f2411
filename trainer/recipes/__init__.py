"""Training recipes, one module per mode, each read top to bottom: start -> train -> finish.

The start and the finish every recipe shares are `trainer.jobrun`, the SFT stage they all train first is
`trainer.sftstage`; no recipe imports another.
"""

from __future__ import annotations
