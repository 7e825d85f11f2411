"""Executors: where the trainer child runs (a local subprocess or a Ray cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

import psutil

from core.errors import UserFacingError
from jobs.executors.base import Executor, Outcome, Run, parse_event

if TYPE_CHECKING:
    from core.settings import Settings
    from jobs.table import Job

__all__ = [
    "Executor",
    "Outcome",
    "Run",
    "alive",
    "make_executor",
    "parse_event",
    "signal_trainer",
    "stop_trainer",
]


def alive(pid: int | None) -> bool:
    """Whether a process runs (a zombie does not count)."""
    if not pid:
        return False
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def signal_trainer(pid: int, signum: int) -> bool:
    """Signal a trainer and what it spawned (its process group when it leads one, never ours); False when gone."""
    try:
        pgid = os.getpgid(pid)
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def stop_trainer(job: Job, settings: Settings) -> bool:
    """Stop a job's trainer that no run of this process follows (SIGTERM, grace, SIGKILL); True if one was signalled.

    Used for a dead supervisor's orphans and by erasure: the trainer checkpoints on SIGTERM and frees the device.
    """
    if job.executor == "ray" and job.executor_ref:
        from jobs.executors.ray import RayExecutor

        with contextlib.suppress(UserFacingError):
            await RayExecutor(settings).stop(job.executor_ref)
            return True
        return False
    if job.pid is None or not job.job_dir or not alive(job.pid):
        return False
    if job.job_dir not in await _cmdline(job.pid):  # the pid was reused by an unrelated process
        return False
    signal_trainer(job.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.training.cancel_grace_s
    while alive(job.pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    if alive(job.pid):
        signal_trainer(job.pid, signal.SIGKILL)
        # Wait for it to be gone: a restarted job must not share the checkpoint folder with a dying one.
        deadline = time.monotonic() + 5.0
        while alive(job.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    return True


async def _cmdline(pid: int, settle_s: float = 2.0) -> str:
    """A live process's command line; waits while it reads empty, as it does while the process is still in exec."""
    # A trainer started a moment ago by another process (erasure can race a job start) may be caught between the
    # kernel releasing its parent and writing its arguments: an empty line then means "not yet", not "a stranger".
    deadline = time.monotonic() + settle_s
    while True:
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return ""
        if cmdline or time.monotonic() >= deadline:
            return cmdline
        await asyncio.sleep(0.02)


def make_executor(kind: str, settings: object) -> Executor:
    """The executor named by `settings.training.executor` (`local` or `ray`)."""
    from jobs.errors import SupervisorError

    if kind == "local":
        from jobs.executors.local import LocalExecutor

        return LocalExecutor(settings)  # type: ignore[arg-type]
    if kind == "ray":
        from jobs.executors.ray import RayExecutor

        return RayExecutor(settings)  # type: ignore[arg-type]
    raise SupervisorError(f"unknown executor {kind!r}: use `local` or `ray` in [training] executor")
