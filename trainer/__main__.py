"""`python -m trainer run|evaluate|bench-train|bench-memory|bench-shape|perplexity ...` (see trainer.child)."""

from __future__ import annotations

import sys

from trainer.child import main

if __name__ == "__main__":
    sys.exit(main())
