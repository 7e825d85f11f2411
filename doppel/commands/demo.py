"""`doppel demo`: the whole loop offline on a generated community and the bundled base model."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="run the whole loop offline: consent, import, train, evaluate, chat")
    p.add_argument(
        "--retrain", action="store_true", help="train a new version even if the demo persona has one"
    )
    p.add_argument("--max-steps", type=int, help="training steps (default: a ~5 minute CPU run)")
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    from doppel.demo import run_demo

    return asyncio.run(run_demo(settings, retrain=args.retrain, max_steps=args.max_steps))
