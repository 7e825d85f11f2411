"""How a trainer ended, in words a person can act on: signals, memory, native crashes and Python errors."""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from jobs.executors.base import Outcome, signal_name
from jobs.table import JobStatus

GIB = 1024**3
# A SIGKILL whose peak resident memory reached this share of the limit is most likely the kernel's OOM killer.
OOM_SHARE = 0.8
NATIVE_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE}
REBUILD = "rebuild for this CPU with `bash scripts/setup.sh`, then check with `doppel doctor`"


@dataclass(frozen=True)
class MemoryFacts:
    """What is known about a job's memory: the trainer's measured peak, the host's limit, the pre-flight estimate."""

    peak_rss: int | None = None
    limit: int | None = None
    estimate: int | None = None


def memory_limit() -> int:
    """Bytes this process tree may use: the machine's RAM, or a smaller cgroup (container) limit."""
    limit = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            raw = Path(path).read_text().strip()
            if raw.isdigit():
                limit = min(limit, int(raw))
    return limit


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _last_error_line(lines: list[str]) -> str:
    """The line a Python traceback ends with (`ValueError: ...`), else the last line."""
    for line in reversed(lines):
        head = line.split(":", 1)[0].strip()
        if (
            ":" in line
            and head
            and " " not in head
            and (head.endswith(("Error", "Exception")) or "." in head)
        ):
            return line.strip()
    return lines[-1].strip() if lines else ""


def explain(
    outcome: Outcome,
    finished: dict[str, Any] | None,
    memory: MemoryFacts | None = None,
    who: str = "the trainer",
    advice: bool = True,
) -> str:
    """One sentence that says why a process failed and, with `advice`, what to do about it."""
    memory = memory or MemoryFacts()
    if outcome.signal is not None:
        cause, todo = _explain_signal(outcome, memory, who)
        return f"{cause}; {todo}" if advice and todo else cause
    if finished is not None and finished.get("error"):
        return str(finished["error"])
    last = _last_error_line(outcome.stderr_tail)
    if outcome.returncode not in (None, 0) and outcome.returncode > 128:
        # A shell or a wrapper reports a signal as 128 + N.
        ended = Outcome(outcome.returncode, outcome.returncode - 128, outcome.stderr_tail)
        return explain(ended, None, memory, who, advice)
    return f"{who} stopped with {outcome.describe} before it finished" + (
        f": {last}" if last else " and no output"
    )


def _explain_signal(outcome: Outcome, memory: MemoryFacts, who: str) -> tuple[str, str]:
    """(cause, what to do) for a process that died by a signal."""
    signum = int(outcome.signal or 0)
    name = signal_name(signum)
    if signum == signal.SIGILL:
        return (
            f"{who} died on a CPU instruction this machine cannot run ({name}): a native library (llama.cpp or "
            "torch) was built for another CPU",
            REBUILD,
        )
    if signum == signal.SIGKILL:
        seen = ""
        if memory.peak_rss:
            seen = f"its memory peaked at {_gib(memory.peak_rss)}"
            seen += f" of {_gib(memory.limit)} on this host" if memory.limit else ""
            seen += f" (pre-flight estimated {_gib(memory.estimate)})" if memory.estimate else ""
        if memory.peak_rss and memory.limit and memory.peak_rss >= OOM_SHARE * memory.limit:
            return (
                f"{who} was killed ({name}), probably by the kernel for running out of memory: {seen}",
                "lower max_length or micro_batch_size, train a smaller base, or free memory, then train again",
            )
        return (
            f"{who} was killed from outside ({name}: kill -9, a job limit or the OOM killer)"
            + (f"; {seen}" if seen else ""),
            "train again, or resume if the job is interrupted",
        )
    if signum in NATIVE_CRASHES:
        last = _last_error_line(outcome.stderr_tail)
        return (
            f"{who} crashed in native code ({name})" + (f"; its last output: {last}" if last else ""),
            "`doppel train --job <job id>` shows the kept stderr tail, and `doppel doctor` checks the build",
        )
    if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        return (
            f"{who} was stopped by {name} before it finished",
            "resume it with `doppel train USER_ID --resume`",
        )
    return f"{who} was killed by signal {signum} ({name})", ""


def classify(
    outcome: Outcome, finished: dict[str, Any] | None, memory: MemoryFacts | None = None, advice: bool = True
) -> tuple[JobStatus, str]:
    """(status, error) for a trainer that ended on its own: the error says why, in words."""
    if outcome.returncode == 0 and finished is not None and finished.get("status") == "succeeded":
        return JobStatus.SUCCEEDED, ""
    if outcome.signal is not None and finished and finished.get("status") == "cancelled":
        return JobStatus.FAILED, str(finished.get("error") or "the trainer stopped when asked to")
    return JobStatus.FAILED, explain(outcome, finished, memory, advice=advice)
