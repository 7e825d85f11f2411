"""The `doppel` console script: parses arguments, builds settings once, maps errors to one-line messages."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings

# Each module in doppel/commands registers one subcommand: `add_parser(subparsers)` and `run(args, settings)`.
COMMANDS = (
    "consent",
    "import_",
    "forget",
    "export_data",
    "train",
    "eval",
    "chat",
    "personas",
    "demo",
    "run",
    "serve",
    "bench",
    "doctor",
)

log = logging.getLogger("doppel")


class _Parser(argparse.ArgumentParser):
    def error(
        self, message: str
    ) -> Any:  # one line, no usage dump: the contract is a clear single-line error
        raise UserFacingError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="doppel", description="Doppel: AI personas of consenting Discord members.")
    parser.add_argument("--config", type=Path, help="settings TOML (default: $DOPPEL_HOME/doppel.toml)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line of stdout"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug output to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"doppel.commands.{name}")
        p = module.add_parser(sub)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def _log_to_file(settings: Settings, verbose: bool) -> None:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.logs_dir / "doppel.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.DEBUG)
        root.addHandler(err)
        root.setLevel(logging.DEBUG)


def emit(result: Any, as_json: bool) -> None:
    """Print a command's result: JSON as the last stdout line, or nothing extra for human output."""
    if as_json and result is not None:
        print(json.dumps(result, default=str, ensure_ascii=False))


def main(argv: Sequence[str] | None = None) -> int:
    settings: Settings | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        settings = Settings.load(args.config)
        _log_to_file(settings, args.verbose)
        result = args._run(args, settings)
        emit(result, args.json)
        return 0
    except UserFacingError as exc:
        print(f"doppel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("doppel: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:
        error_id = uuid.uuid4().hex[:8]
        log.error("internal error %s\n%s", error_id, traceback.format_exc())
        where = f"; details in {settings.logs_dir / 'doppel.log'}" if settings else ""
        print(f"doppel: internal error {error_id}: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
