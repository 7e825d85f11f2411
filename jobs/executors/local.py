"""Local executor: the trainer as a subprocess in its own process group, events read from its stdout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from core.settings import Settings
from jobs.errors import ExecutorError
from jobs.executors.base import Outcome, StderrTail, parse_event
from jobspec.jobdata import SUPERVISOR_PID_ENV

# Event lines can carry a metrics dict; asyncio's default 64 KiB line limit is too tight for a verbose trainer.
STREAM_LIMIT = 4 * 1024 * 1024
# How often the trainer's memory is sampled: often enough to see the climb before an OOM kill, cheap to do.
MEMORY_SAMPLE_S = 0.5


def trainer_command(job_dir: Path, resume: bool) -> list[str]:
    """The child's argv: the same interpreter, `-m trainer run JOB_DIR [--resume]`."""
    return [sys.executable, "-m", "trainer", "run", str(job_dir), *(["--resume"] if resume else [])]


def device_env(device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the child: one GPU through CUDA_VISIBLE_DEVICES, or none at all for `cpu`."""
    env = dict(os.environ if base is None else base)
    if device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
    elif device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONUNBUFFERED"] = "1"
    env[SUPERVISOR_PID_ENV] = str(os.getpid())  # the child stops itself when this process dies
    return env


class LocalRun:
    """A trainer subprocess: its pid is also its process-group id (start_new_session)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid: int | None = proc.pid
        self.ref = str(proc.pid)
        self.stderr = StderrTail()
        self.peak_rss = 0
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        self._memory_task = asyncio.create_task(self._sample_memory())

    async def _sample_memory(self) -> None:
        # Resident memory of the trainer and its children; the peak explains a SIGKILL from the OOM killer.
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while self.proc.returncode is None:
            total = 0
            with contextlib.suppress(psutil.Error):
                total = root.memory_info().rss
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
            self.peak_rss = max(self.peak_rss, total)
            await asyncio.sleep(MEMORY_SAMPLE_S)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            try:
                line = await self.proc.stderr.readline()
            except ValueError:  # a line longer than STREAM_LIMIT: keep reading, drop the line
                continue
            if not line:
                return
            self.stderr.add(line.decode("utf-8", "replace"))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        assert self.proc.stdout is not None
        while True:
            try:
                line = await self.proc.stdout.readline()
            except ValueError:
                continue
            if not line:
                return
            event = parse_event(line.decode("utf-8", "replace"))
            if event is not None:
                yield event

    async def wait(self) -> Outcome:
        code = await self.proc.wait()
        self._memory_task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stderr_task, timeout=5)
        peak = self.peak_rss or None
        if code < 0:
            return Outcome(returncode=code, signal=-code, stderr_tail=self.stderr.lines(), peak_rss=peak)
        return Outcome(returncode=code, stderr_tail=self.stderr.lines(), peak_rss=peak)

    async def terminate(self, grace_s: float) -> None:
        if self.proc.returncode is not None:
            return
        kill_group(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=grace_s)
        except TimeoutError:
            kill_group(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def send_job_key(proc: asyncio.subprocess.Process, settings: Settings, job_dir: Path) -> None:
    """Write the job folder's dataset key on the child's stdin (one hex line) and close it."""
    from data.crypto import job_key_for

    assert proc.stdin is not None
    with contextlib.suppress(OSError, ConnectionError):  # a child that died at once: its outcome says why
        proc.stdin.write(job_key_for(settings, job_dir).hex().encode() + b"\n")
        await proc.stdin.drain()
    proc.stdin.close()


def kill_group(pgid: int, signum: int) -> bool:
    """Signal a whole process group (the trainer and anything it spawned); False when it is already gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class LocalExecutor:
    """Runs `python -m trainer run JOB_DIR` on this machine."""

    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def launch(self, job_id: str, job_dir: Path, device: str, resume: bool) -> LocalRun:
        try:
            proc = await asyncio.create_subprocess_exec(
                *trainer_command(job_dir, resume),
                stdin=asyncio.subprocess.PIPE,  # the job key, written below: never on disk, not in the environment
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=device_env(device),
                cwd=str(job_dir),
                start_new_session=True,
                limit=STREAM_LIMIT,
            )
        except OSError as exc:
            raise ExecutorError(f"could not start the trainer: {exc}") from None
        await send_job_key(proc, self.settings, job_dir)
        return LocalRun(proc)
