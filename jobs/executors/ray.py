"""Ray executor: the same trainer entrypoint submitted through Ray's Job Submission API.

The job folder is passed by path, so the Ray worker that runs the entrypoint must see the same filesystem as the
supervisor: true for a head on this machine, and for a real cluster when DOPPEL_HOME/jobs is on a shared mount
(NFS, a cloud file store) at the same path on every node. Events come back through `tail_job_logs`; the adapter
comes back because the trainer writes it into that shared job folder, where the supervisor publishes it from.
A cluster without a shared mount would need the dataset shipped in `runtime_env` and the adapter uploaded to
object storage by the entrypoint; that is not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from core.settings import Settings
from data.crypto import job_key_for
from jobs.errors import ExecutorError
from jobs.executors.base import Outcome, StderrTail, parse_event
from jobspec.jobdata import KEY_ENV

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 0.5


def entrypoint(job_dir: Path, resume: bool, python: str = sys.executable) -> str:
    """Shell entrypoint Ray runs: the trainer with the supervisor's interpreter, inside the job folder."""
    args = [python, "-m", "trainer", "run", str(job_dir), *(["--resume"] if resume else [])]
    return f"cd {shlex.quote(str(job_dir))} && exec {shlex.join(args)}"


class RayRun:
    """A trainer submitted to a Ray cluster, followed by its submission id."""

    def __init__(self, client: Any, submission_id: str) -> None:
        self.client = client
        self.pid: int | None = None
        self.ref = submission_id
        self.stderr = StderrTail()
        self._stopped = False

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        # Ray interleaves the child's stdout and stderr in one log: events are the JSON lines, the rest is stderr.
        buffer = ""
        async for chunk in self.client.tail_job_logs(self.ref):
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                event = parse_event(line)
                if event is None:
                    self.stderr.add(line)
                else:
                    yield event
        if buffer:
            event = parse_event(buffer)
            if event is not None:
                yield event
            else:
                self.stderr.add(buffer)

    async def _status(self) -> Any:
        return await asyncio.to_thread(self.client.get_job_info, self.ref)

    async def wait(self) -> Outcome:
        while True:
            info = await self._status()
            status = str(getattr(info.status, "value", info.status))
            if status in TERMINAL:
                break
            await asyncio.sleep(POLL_S)
        code = getattr(info, "driver_exit_code", None)
        if status == "SUCCEEDED":
            return Outcome(returncode=0, stderr_tail=self.stderr.lines())
        if status == "STOPPED":
            return Outcome(
                returncode=code, signal=15, stderr_tail=self.stderr.lines(), detail="stopped through Ray"
            )
        # The entrypoint is `exec`ed by a shell: a signal death shows up as a negative code or 128+N.
        if code is not None and code < 0:
            return Outcome(returncode=code, signal=-code, stderr_tail=self.stderr.lines())
        if code is not None and code > 128:
            return Outcome(returncode=code, signal=code - 128, stderr_tail=self.stderr.lines())
        detail = f"exit code {code}" if code is not None else f"ray: {info.message or 'failed'}"
        return Outcome(
            returncode=code if code is not None else 1, stderr_tail=self.stderr.lines(), detail=detail
        )

    async def terminate(self, grace_s: float) -> None:
        # Ray's stop_job sends SIGTERM and escalates to SIGKILL itself (RAY_JOB_STOP_WAIT_TIME_S).
        self._stopped = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.client.stop_job, self.ref)
        deadline = asyncio.get_running_loop().time() + grace_s + 10
        while asyncio.get_running_loop().time() < deadline:
            info = await self._status()
            if str(getattr(info.status, "value", info.status)) in TERMINAL:
                return
            await asyncio.sleep(POLL_S)


class RayExecutor:
    """Submits the trainer to `settings.training.ray_address` (e.g. http://127.0.0.1:8265)."""

    name = "ray"

    def __init__(self, settings: Settings, address: str | None = None) -> None:
        self.settings = settings
        self.address = address or settings.training.ray_address
        self._client: Any = None

    async def client(self) -> Any:
        """The Job Submission client, connected once (its constructor does a blocking HTTP check)."""
        if self._client is None:
            if not self.address:
                raise ExecutorError(
                    "the Ray executor needs [training] ray_address (e.g. http://127.0.0.1:8265)"
                )
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError:
                raise ExecutorError("the Ray executor needs ray: pip install 'doppel[ray]'") from None
            try:
                self._client = await asyncio.to_thread(JobSubmissionClient, self.address)
            except Exception as exc:
                raise ExecutorError(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
        return self._client

    async def launch(self, job_id: str, job_dir: Path, device: str, resume: bool) -> RayRun:
        client = await self.client()
        attempt = 1 + sum(1 for _ in job_dir.glob(".ray-attempt-*"))
        (job_dir / f".ray-attempt-{attempt}").touch()
        submission_id = f"doppel-{job_id}-{attempt}"
        env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # A Ray entrypoint has no stdin: the dataset key travels in its environment, readable by whoever can read
        # the cluster's job metadata (weaker than the local executor's pipe; the child drops it once read).
        env[KEY_ENV] = job_key_for(self.settings, job_dir).hex()
        gpus = 1 if device.startswith("cuda") else 0
        try:
            await asyncio.to_thread(
                client.submit_job,
                entrypoint=entrypoint(job_dir, resume),
                submission_id=submission_id,
                runtime_env={"env_vars": env},
                entrypoint_num_cpus=1,
                entrypoint_num_gpus=gpus or None,
                metadata={"doppel_job": job_id},
            )
        except Exception as exc:
            raise ExecutorError(f"Ray refused the job: {exc}") from None
        return RayRun(client, submission_id)

    async def stop(self, submission_id: str) -> None:
        """Stop a submission found at start-up that no supervisor follows any more."""
        client = await self.client()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(client.stop_job, submission_id)
