"""`python -m doppel` runs the CLI."""

from __future__ import annotations

import sys

from doppel.cli import main

sys.exit(main())
