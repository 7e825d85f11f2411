"""`python -m trainer run JOB_DIR [--resume]`."""

from __future__ import annotations

import sys

from trainer.child import main

if __name__ == "__main__":
    sys.exit(main())
