"""The benchmarks' torch work in a trainer child: `python -m trainer ...` started as the job executors start it.

The shell never imports `trainer` (tests/test_boundaries.py): it hands the child its inputs as arguments and files,
reads the child's events on stdout, and turns a failure into one line (the child's stderr goes to the log).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

from core.errors import UserFacingError
from jobs.executors.base import StderrTail, parse_event, signal_name
from jobs.executors.local import device_env

log = logging.getLogger(__name__)


def trainer_events(*args: str, what: str) -> list[dict[str, Any]]:
    """Run `python -m trainer ARGS` to the end; its events, the last a successful `finished`, else a one-line error."""
    # The executors' environment: unbuffered, and the child stops itself if this process dies.
    env = {**device_env(""), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
    )
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e is not None]
    finished: dict[str, Any] = next((e for e in reversed(events) if e.get("event") == "finished"), {})
    if proc.returncode == 0 and finished.get("status") == "succeeded":
        return events
    tail = StderrTail()
    for line in proc.stderr.splitlines():
        tail.add(line)
    lines = tail.lines()
    log.warning(
        "%s failed (exit %s); the trainer's stderr ends:\n%s", what, proc.returncode, "\n".join(lines)
    )
    if proc.returncode < 0:
        why = f"killed by {signal_name(-proc.returncode)}"
    else:
        why = str(finished.get("error") or (lines[-1] if lines else f"exit code {proc.returncode}"))
    raise UserFacingError(f"{what} failed: {' '.join(why.split())}")


def trainer_result(*args: str, what: str) -> dict[str, Any]:
    """The `result` a benchmark command of the trainer (`trainer/bench.py`) reports; its failure as one line."""
    return dict(trainer_events(*args, what=what)[-1].get("result") or {})
