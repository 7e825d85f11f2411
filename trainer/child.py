"""The training child: `python -m trainer run JOB_DIR [--resume]`, events on stdout, logs on stderr, exit codes.

The same entry point runs the benchmarks' torch work (`bench-train`, `bench-memory`, `bench-shape`, `perplexity`:
`trainer.bench`), so the shell's benchmarks start the trainer as a process instead of importing it.

Exit codes: 0 succeeded; 1 failed (a `finished` event with status "failed" and a one-line error); 143 cancelled by
SIGTERM (128 + 15, what a shell reports for a TERM-killed process), after a `finished` event with status "cancelled";
2 bad command line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.hostshare import apply_priority
from jobspec.config import TrainConfig
from jobspec.errors import JobCancelled
from jobspec.events import Emitter, stdout_emitter
from trainer import bench
from trainer.lifeline import watch_supervisor

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 143
# One recipe module per mode of TrainConfig (`sft+kto` -> trainer.recipes.kto): the modes are declared there only.
RECIPES = {mode: f"trainer.recipes.{mode.rpartition('+')[2]}" for mode in TrainConfig.choices("mode")}


def run_job(
    job_dir: Path,
    emitter: Emitter,
    cancel: threading.Event,
    *,
    resume: bool = False,
    key: bytes | None = None,
    evaluate: Path | None = None,
) -> int:
    """Run one job folder to completion (or only evaluate the adapter `evaluate`); always ends with `finished`."""
    try:
        cfg = TrainConfig.from_json(job_dir / "config.json")
        # Before torch starts its thread pools (they inherit it): training is background work on a shared host.
        emitter.emit("phase", phase="starting", priority=apply_priority(cfg.priority))
        if evaluate is not None:
            from trainer.jobrun import reevaluate

            result = reevaluate(cfg, job_dir, evaluate, emitter, key=key)
        else:
            recipe = importlib.import_module(RECIPES[cfg.mode])
            result = recipe.run(cfg, job_dir, emitter, cancel, resume=resume, key=key)
    except JobCancelled as exc:
        emitter.emit("finished", status="cancelled", error=str(exc))
        return EXIT_CANCELLED
    except UserFacingError as exc:
        emitter.emit("finished", status="failed", error=str(exc))
        return EXIT_FAILED
    except Exception as exc:
        # Unexpected: the full traceback goes to stderr (the job log), the event carries one line.
        traceback.print_exc(file=sys.stderr)
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        emitter.emit("finished", status="failed", error=f"{type(exc).__name__}: {line}"[:500])
        return EXIT_FAILED
    emitter.emit("finished", status="succeeded", adapter=result.get("adapter"), error=None)
    return EXIT_OK


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer`."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Doppel training child")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train one job folder")
    p.add_argument("job_dir", type=Path)
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in JOB_DIR/checkpoints"
    )
    e = sub.add_parser("evaluate", help="evaluate a saved adapter on a job folder's held-out data and panel")
    e.add_argument("job_dir", type=Path)
    e.add_argument("--adapter", type=Path, required=True, help="the adapter folder to evaluate")
    bench.add_parsers(sub)
    args = parser.parse_args(argv)
    emitter = stdout_emitter()
    # Libraries print to stdout (progress bars, warnings); stdout belongs to the events, so route them to stderr.
    sys.stdout = sys.stderr
    _quiet_libraries()
    if args.command in bench.COMMANDS:
        # A benchmark started by a shell that died has no one to read its result: stop at once.
        watch_supervisor(lambda: os._exit(EXIT_CANCELLED))
        return bench.run(args, emitter)
    cancel = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, on_term)
    # A supervisor that dies (SIGKILL, OOM, a crash) takes its trainer with it: checkpoint, then stop.
    watch_supervisor(cancel.set)
    if not args.job_dir.is_dir():
        emitter.emit("finished", status="failed", error=f"job folder not found: {args.job_dir}")
        return EXIT_FAILED
    from jobspec.jobdata import dataset_sealed, read_key

    try:
        # The parent writes the job key on stdin (a pipe: never on disk, not in /proc/PID/environ).
        key = (
            read_key(sys.stdin.buffer if sys.stdin is not None else None)
            if dataset_sealed(args.job_dir)
            else None
        )
    except UserFacingError as exc:
        emitter.emit("finished", status="failed", error=str(exc))
        return EXIT_FAILED
    if args.command == "evaluate":
        return run_job(args.job_dir.resolve(), emitter, cancel, key=key, evaluate=args.adapter.resolve())
    return run_job(args.job_dir.resolve(), emitter, cancel, resume=args.resume, key=key)
