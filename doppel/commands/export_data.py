"""`doppel export-data` (not built yet)."""

from __future__ import annotations

import argparse
from typing import Any

from doppel.errors import UserFacingError
from doppel.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser("export-data", help="(not available yet)")


def run(args: argparse.Namespace, settings: Settings) -> Any:
    raise UserFacingError("`doppel export-data` is not available yet")
