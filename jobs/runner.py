"""Following one claimed job: prepare its folder, launch the trainer, record events, classify, publish, clean."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import UserFacingError
from core.settings import Settings
from jobs.table import Job, JobStatus, JobTable, remove_job_dir
from jobspec.progress import ProgressState

if TYPE_CHECKING:
    from jobs.executors.base import Executor, Outcome, Run
    from jobspec.config import TrainConfig
    from models.registry import Registry

log = logging.getLogger(__name__)
RUNNING = (JobStatus.RUNNING,)


class ServingPrep(Protocol):
    """What publishing needs of serving: build what a persona's first reply would otherwise wait for."""

    async def prepare(self, member_id: str) -> dict[str, float | int]: ...


class JobHost(Protocol):
    """What a runner needs from the supervisor that claimed its job: the narrow seam, no private state."""

    settings: Settings
    jobs: JobTable

    @property
    def executor(self) -> Executor: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def closing(self) -> bool: ...

    async def get(self, job_id: str) -> Job: ...

    async def materialize(self, job: Job, job_dir: Path, config: dict[str, Any]) -> dict[str, Any]: ...

    def cancelled_by(self, job_id: str) -> str | None: ...

    def attach(self, job_id: str, run: Run) -> None: ...

    def changed(self) -> None: ...

    async def prepare_serving(self, member_id: str | None) -> dict[str, Any]: ...


class JobRunner:
    """The supervisor's side of one running trainer."""

    def __init__(self, supervisor: JobHost, job_id: str) -> None:
        self.sup = supervisor
        self.job_id = job_id
        self.state = ProgressState(status="running")
        self.finished: dict[str, Any] | None = None
        self.artifact: Path | None = None
        self.export_error: str | None = None
        self.metrics: dict[str, Any] = {}
        self._last_write = 0.0

    async def run(self) -> None:
        sup = self.sup
        job = await sup.get(self.job_id)
        self.state = job.progress
        self.state.status = "running"
        job_dir = Path(job.job_dir)
        try:
            resume = await self._prepare(job, job_dir)
            if sup.cancelled_by(self.job_id) is not None or sup.closing:
                await self._end_without_run(job)
                return
            run = await sup.executor.launch(job.id, job_dir, job.device, resume)
            sup.attach(job.id, run)
            await sup.jobs.update(
                job.id,
                pid=run.pid,
                executor=sup.executor.name,
                executor_ref=run.ref,
                heartbeat_at=time.time(),
            )
            outcome = await self._follow(run)
        except UserFacingError as exc:
            await self._finish(job, JobStatus.FAILED, str(exc), "not started")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed in the supervisor", job.id)
            await self._finish(
                job, JobStatus.FAILED, f"supervisor error: {type(exc).__name__}: {exc}", "not started"
            )
            return
        try:
            await self._conclude(job, outcome)
        except Exception as exc:
            # The trainer ran; what failed is ours (publishing, the store). The job must still end, or every
            # waiter (the bot's progress post, `doppel train`) follows a job that stays "running" forever.
            error_id = uuid.uuid4().hex[:8]
            log.exception("job %s: concluding failed (error id %s)", job.id, error_id)
            await self._finish(
                job,
                JobStatus.FAILED,
                f"the supervisor failed after training (error id {error_id} in its log): {type(exc).__name__}: {exc}",
                outcome.describe,
            )

    async def _prepare(self, job: Job, job_dir: Path) -> bool:
        """Write config.json and the dataset (parent side); True when the trainer should resume a checkpoint."""
        from jobspec.config import TrainConfig

        config = {k: v for k, v in job.config.items() if not k.startswith("_")}
        checkpoints = job_dir / "checkpoints"
        has_checkpoint = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
        if job.resume and has_checkpoint and (job_dir / "dataset" / "train.jsonl").exists():
            return True  # the checkpoint's micro-batch stays: refitting would change what resumes
        train_config = await self._fit_now(job, TrainConfig.from_dict(config))
        job_dir.mkdir(parents=True, exist_ok=True)
        train_config.to_json(job_dir / "config.json")
        self.state.phase = "building the dataset"
        await self._write_progress(force=True)
        await self.sup.materialize(job, job_dir, config)
        self.state.phase = ""
        return False

    async def _fit_now(self, job: Job, config: TrainConfig) -> TrainConfig:
        """Pre-flight again now that the job has its slot: memory was judged when it was queued, for its turn.

        Raises `PreflightError` (the job fails, not started) when it cannot fit what this host has free now;
        a smaller micro-batch that fits is recorded on the job (`job.config` too) and run."""
        from jobs.preflight import plan_job, require

        if self.sup.executor.name != "local":
            return config  # a Ray worker's memory is not this host's
        plan = await asyncio.to_thread(plan_job, self.sup.settings, config, job.device)
        require(plan.checks)
        if plan.config != config:
            job.config.update({**plan.config.to_dict(), "_preflight_mem_bytes": plan.mem_bytes})
            await self.sup.jobs.update(job.id, config_json=job.config)
            log.info(
                "job %s: micro-batch %d -> %d to fit %s now",
                job.id,
                config.micro_batch_size,
                plan.config.micro_batch_size,
                job.device,
            )
        return plan.config

    async def _follow(self, run: Run) -> Outcome:
        beat = asyncio.create_task(self._heartbeat())
        try:
            async for event in run.events():
                kind = event.get("event")
                self.state.apply(event)
                if kind == "artifact" and event.get("kind", "adapter") == "adapter" and event.get("path"):
                    self.artifact = Path(str(event["path"]))
                    self.export_error = str(event.get("export_error") or "") or None
                elif kind == "metrics":
                    self.metrics = {k: v for k, v in event.items() if k not in ("event", "ts")}
                elif kind == "finished":
                    self.finished = event
                await self._write_progress(force=kind in ("started", "finished", "artifact", "phase"))
            return await run.wait()
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _heartbeat(self) -> None:
        # Long steps send no events for a while: the heartbeat still tells other processes this job is followed.
        while True:
            await asyncio.sleep(self.sup.settings.training.heartbeat_s)
            await self.sup.jobs.update(self.job_id, heartbeat_at=time.time())

    async def _write_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_write >= min(self.sup.settings.training.heartbeat_s, 2.0):
            self._last_write = now
            await self.sup.jobs.update(self.job_id, progress_json=self.state, heartbeat_at=time.time())
            self.sup.changed()

    async def _end_without_run(self, job: Job) -> None:
        actor = self.sup.cancelled_by(self.job_id)
        if actor is not None:
            await self._finish(job, JobStatus.CANCELLED, f"cancelled by {actor}", "cancelled before start")
        else:
            await self._finish(
                job, JobStatus.INTERRUPTED, "the supervisor stopped before the trainer started", "not started"
            )

    async def _conclude(self, job: Job, outcome: Outcome) -> None:
        from jobs.endings import MemoryFacts, classify, memory_limit

        row = await self.sup.get(job.id)
        detail = outcome.describe
        if outcome.peak_rss:
            detail += f"; peak RSS {outcome.peak_rss / 1024**2:.0f} MiB"
        if outcome.stderr_tail:
            detail += "\n" + "\n".join(outcome.stderr_tail[-15:])
        if row.status != JobStatus.RUNNING:
            # Someone else ended it (the erasure cascade cancels jobs that involve an erased member).
            remove_job_dir(job.job_dir)
            return
        actor = self.sup.cancelled_by(job.id) or row.cancel_requested_by
        if actor:
            await self._finish(job, JobStatus.CANCELLED, f"cancelled by {actor}", detail)
            return
        # Stopped after the trained adapter was saved and announced (during its evaluation): it is kept below as
        # a candidate, as for any failure of the evaluation, rather than trained again by a resume.
        kept = self.artifact is not None and self.artifact.is_dir()
        if self.sup.closing and outcome.returncode != 0 and not kept:
            await self._finish(
                job,
                JobStatus.INTERRUPTED,
                f"the supervisor stopped at step {self.state.step}; resume to continue",
                detail,
            )
            return
        estimate = job.config.get("_preflight_mem_bytes")
        memory = MemoryFacts(outcome.peak_rss, memory_limit(), int(estimate) if estimate else None)
        status, error = classify(outcome, self.finished, memory)
        if status == JobStatus.SUCCEEDED:
            if self.artifact is None:
                status, error = JobStatus.FAILED, "the trainer finished without announcing an adapter"
            else:
                # Before the persona goes live: its first reply then finds the retrieval index built, not embedding
                # thousands of messages while the member waits. The cost is part of the job's result.
                self.state.phase = "preparing serving"
                self.state.serving = await self.sup.prepare_serving(job.member_id)
                try:
                    adapter = await self.sup.registry.publish(
                        self.artifact, job_id=job.id, member_id=job.member_id
                    )
                except UserFacingError as exc:
                    status, error = JobStatus.FAILED, f"publishing the adapter failed: {exc}"
                else:
                    await self._finish(job, JobStatus.SUCCEEDED, None, detail, adapter_id=adapter.id)
                    return
        elif self.artifact is not None and self.artifact.is_dir():
            # The trainer saves and announces the adapter before evaluating it: a failure after that (memory, a
            # bug, a signal) keeps the trained adapter as a candidate, and `doppel eval` evaluates it later. So
            # does a failed GGUF conversion (the artifact says so): `doppel eval` converts it, then evaluates it.
            error = self.export_error or classify(outcome, self.finished, memory, advice=False)[1]
            what = "export" if self.export_error else "evaluation"  # the fix is `doppel eval`, not retraining
            try:
                adapter = await self.sup.registry.publish(
                    self.artifact, job_id=job.id, member_id=job.member_id, **{f"{what}_error": error}
                )
            except UserFacingError as exc:
                error = f"{error}; the trained adapter could not be kept: {exc}"
            else:
                await self._finish(
                    job, JobStatus.SUCCEEDED, f"{what} failed: {error}", detail, adapter_id=adapter.id
                )
                return
        await self._finish(job, status, error, detail)

    async def _finish(
        self, job: Job, status: JobStatus, error: str | None, detail: str, **values: Any
    ) -> None:
        self.state.status = status.value
        if status != JobStatus.SUCCEEDED:
            self.state.eta_s = None
        await self.sup.jobs.transition(
            job.id,
            RUNNING,
            status,
            error=error,
            exit_detail=detail,
            finished_at=None if status == JobStatus.INTERRUPTED else time.time(),
            progress_json=self.state,
            heartbeat_at=time.time(),
            **values,
        )
        if status != JobStatus.INTERRUPTED:
            # Dataset (member plaintext) and checkpoints go with the folder; only a resumable job keeps them.
            remove_job_dir(job.job_dir)
        self.sup.changed()
