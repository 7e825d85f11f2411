"""What every executor hands the supervisor: a running trainer whose events, end and cancellation it can follow."""

from __future__ import annotations

import json
import signal
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

STDERR_TAIL_LINES = 40


@dataclass
class Outcome:
    """How a trainer process ended, before the supervisor folds in events and cancel requests."""

    returncode: int | None
    signal: int | None = None
    stderr_tail: list[str] = field(default_factory=list)
    detail: str = ""
    peak_rss: int | None = None  # the trainer's process tree at its largest, when the executor can see it

    @property
    def describe(self) -> str:
        """`exit 0`, `exit code 3` or `killed by signal 9`, as stored in the jobs table's exit_detail."""
        if self.detail:
            return self.detail
        if self.signal is not None:
            return f"killed by signal {self.signal} ({signal_name(self.signal)})"
        return f"exit code {self.returncode}"


class Run(Protocol):
    """One launched trainer."""

    pid: int | None
    ref: str

    def events(self) -> AsyncIterator[dict[str, Any]]:
        """The trainer's JSON-lines events, in order, until its stdout ends."""
        ...

    async def wait(self) -> Outcome:
        """Block until the trainer is gone and say how it ended."""
        ...

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM (the trainer checkpoints and exits), then SIGKILL once `grace_s` has passed."""
        ...


class Executor(Protocol):
    """Starts `python -m trainer run JOB_DIR [--resume]` somewhere."""

    name: str

    async def launch(self, job_id: str, job_dir: Path, device: str, resume: bool) -> Run:
        """Start the trainer for a prepared job folder on `device`."""
        ...


def parse_event(line: str) -> dict[str, Any] | None:
    """A JSON-lines event, or None for any other output (library chatter that reached stdout)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


class StderrTail:
    """The last lines a trainer wrote to stderr: a failure's explanation without keeping a whole log."""

    def __init__(self, limit: int = STDERR_TAIL_LINES) -> None:
        self._lines: deque[str] = deque(maxlen=limit)

    def add(self, line: str) -> None:
        line = line.rstrip()
        if line:
            self._lines.append(line[:500])

    def lines(self) -> list[str]:
        return list(self._lines)


def signal_name(signum: int) -> str:
    """`SIGKILL` for 9, or the number when the platform has no name for it."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
