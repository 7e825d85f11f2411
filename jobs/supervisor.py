"""The one training supervisor the CLI and the bot share: queue per device, executors, recovery, publishing.

State lives in the store's `jobs` table, so several supervisors (the bot and a `doppel train` in a terminal) can
share one DOPPEL_HOME: slots are claimed with a compare-and-set on the table, each job is followed by the process
that submitted (or resumed) it, and a job whose supervisor died is found at start-up and marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.chatformat import DEFAULT_STYLE
from core.errors import UserFacingError
from core.settings import Settings
from jobs.errors import JobConflictError, JobNotFoundError, SupervisorError
from jobs.executors import alive, stop_trainer
from jobs.executors.base import Executor, Run
from jobs.table import Job, JobStatus, JobTable, new_job_id, remove_job_dir

if TYPE_CHECKING:
    from jobs.runner import ServingPrep
    from models.registry import Registry

log = logging.getLogger(__name__)
RUNNING = (JobStatus.RUNNING,)
POLL_S = 1.0


class Supervisor:
    """Submit, queue, run, follow, cancel, resume and publish training jobs."""

    def __init__(
        self,
        store: Any,
        settings: Settings,
        executor: Executor | None = None,
        registry: Registry | None = None,
        serving: ServingPrep | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.jobs = JobTable(store)
        self.pid = os.getpid()
        self._executor = executor
        self._registry = registry
        self._serving = serving
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, Run] = {}
        self._cancelled: dict[str, str] = {}
        self._pulse = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._devices: list[str] | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    @property
    def executor(self) -> Executor:
        if self._executor is None:
            from jobs.executors import make_executor

            self._executor = make_executor(self.settings.training.executor, self.settings)
        return self._executor

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from models.registry import Registry

            self._registry = Registry(self.store, self.settings)
        return self._registry

    def devices(self) -> list[str]:
        """Device queues: `[training] devices`, or every GPU nvidia-smi sees, or `cpu`."""
        if self._devices is None:
            from jobs.preflight import devices

            self._devices = [d.name for d in devices(self.settings)]
        return self._devices

    async def start(self) -> list[Job]:
        """Recover jobs whose supervisor is gone (they become `interrupted`), then start serving the queue."""
        recovered = await self.recover()
        self.registry.sweep()
        if self._scheduler is None:
            self._scheduler = asyncio.create_task(self._schedule(), name="doppel-supervisor")
        return recovered

    async def close(self) -> None:
        """Stop: running jobs are asked to checkpoint and stop, and become `interrupted` (resumable)."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for run in list(self._runs.values()):
            await run.terminate(self.settings.training.cancel_grace_s)
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for job in await self.jobs.with_status(JobStatus.QUEUED):
            if job.supervisor_pid == self.pid:
                await self.jobs.transition(
                    job.id,
                    (JobStatus.QUEUED,),
                    JobStatus.INTERRUPTED,
                    error="the supervisor stopped before the job started",
                )

    async def recover(self) -> list[Job]:
        """A queued or running job whose supervisor process is gone becomes `interrupted`; its trainer is stopped."""
        found: list[Job] = []
        stale_after = max(60.0, 10 * self.settings.training.heartbeat_s)
        for job in await self.jobs.with_status(JobStatus.QUEUED, JobStatus.RUNNING):
            if job.id in self._tasks:
                continue
            owner_alive = job.supervisor_pid != self.pid and alive(job.supervisor_pid)
            if owner_alive and job.status == JobStatus.RUNNING and job.heartbeat_at is not None:
                owner_alive = time.time() - job.heartbeat_at < stale_after
            if owner_alive:
                continue
            if job.status == JobStatus.RUNNING:
                await stop_trainer(job, self.settings)
                why = f"the supervisor stopped while the job ran (last step {job.progress.step}); resume to continue"
            else:
                why = "the supervisor stopped before the job started"
            state = job.progress
            state.status = JobStatus.INTERRUPTED.value
            if await self.jobs.transition(
                job.id,
                (job.status,),
                JobStatus.INTERRUPTED,
                error=why,
                exit_detail="lost at restart",
                pid=None,
                progress_json=state,
            ):
                found.append(await self._get(job.id))
        return found

    # -- requests ---------------------------------------------------------------------------------------------
    async def submit(
        self,
        member_id: str | None,
        *,
        requested_by: str,
        source: str = "cli",
        mode: str = "sft",
        base: str | None = None,
        device: str | None = None,
        multi: bool = False,
        **overrides: Any,
    ) -> Job:
        """Queue a job for a member after pre-flight; `overrides` are TrainConfig fields (max_steps, epochs...)."""
        from jobs.preflight import plan_job, require
        from jobspec.config import TrainConfig

        if member_id is None and not multi:
            raise SupervisorError("name a member to train, or ask for the multi-persona adapter")
        existing = await self.jobs.active_for_member(member_id)
        if existing is not None:
            raise JobConflictError(_conflict_message(existing))
        from models.catalog import Catalog

        model = Catalog(self.settings).base(base)
        fields: dict[str, Any] = {
            "member_id": member_id or "",
            "mode": mode,
            "base_name": model.name,
            "chat_template": model.template or "",
            "chat_template_source": model.template_source or "",
        }
        if "base_model" not in overrides:
            # HF weights registered with the base are trained on; the GGUF is what llama.cpp serves.
            fields["base_model"] = model.hf_path or model.path
            if model.hf_path:
                fields["base_gguf"] = model.path
        if member_id and "persona_name" not in overrides:
            member = await self.store.members.get(member_id)
            fields["persona_name"] = (member.display_name or member.name) if member is not None else member_id
        config = TrainConfig.from_settings(self.settings, **{**fields, **overrides})
        device = device or await self._pick_device()
        # A host with less memory trains the same steps in smaller micro-batches rather than refusing the job.
        # Judged for when its turn comes (the runner judges again then): a job queued behind another on a busy
        # GPU is not refused for the memory that job holds now.
        freed = await self._freed_before_turn(device)
        plan = await asyncio.to_thread(plan_job, self.settings, config, device, freed)
        require(plan.checks)
        config = plan.config
        job_id = new_job_id()
        job = Job(
            id=job_id,
            member_id=member_id,
            requested_by=requested_by,
            source=source,
            mode=mode,
            device=device,
            job_dir=str(self.settings.jobs_dir / job_id),
            config={
                **config.to_dict(),
                "_multi": multi,
                "_preflight_mem_bytes": plan.mem_bytes,
            },
            created_at=time.time(),
            supervisor_pid=self.pid,
            executor=self.executor.name,
        )
        if not await self.jobs.insert_if_idle(job):
            existing = await self.jobs.active_for_member(member_id)
            raise JobConflictError(
                _conflict_message(existing) if existing else "the member already has a job"
            )
        self._poke()
        return await self._get(job_id)

    async def resume(self, job_id: str) -> Job:
        """Queue an interrupted job again; it continues from its last checkpoint when one is left."""
        job = await self._get(job_id)
        if job.status != JobStatus.INTERRUPTED:
            raise SupervisorError(
                f"job {job_id} is {job.status.value}; only an interrupted job can be resumed"
            )
        state = job.progress
        state.status = JobStatus.QUEUED.value
        ok = await self.jobs.transition(
            job_id,
            (JobStatus.INTERRUPTED,),
            JobStatus.QUEUED,
            resume=True,
            supervisor_pid=self.pid,
            error=None,
            exit_detail=None,
            pid=None,
            executor=self.executor.name,
            progress_json=state,
        )
        if not ok:
            raise SupervisorError(f"job {job_id} changed state; try again")
        self._poke()
        return await self._get(job_id)

    async def cancel(self, job_id: str, actor: str) -> Job:
        """Cancel a queued, running or interrupted job (SIGTERM, then SIGKILL after the grace period)."""
        job = await self._get(job_id)
        if job.status.final:
            return job
        if job.status in (JobStatus.QUEUED, JobStatus.INTERRUPTED):
            if await self.jobs.transition(
                job_id,
                (job.status,),
                JobStatus.CANCELLED,
                finished_at=time.time(),
                error=f"cancelled by {actor}",
                cancel_requested_by=actor,
            ):
                remove_job_dir(job.job_dir)
                self._poke()
                return await self._get(job_id)
            job = await self._get(job_id)
        if job.status != JobStatus.RUNNING:
            return job
        self._cancelled[job_id] = actor
        await self.jobs.update(job_id, cancel_requested_by=actor)
        run = self._runs.get(job_id)
        if run is not None:
            await run.terminate(self.settings.training.cancel_grace_s)
        elif job_id not in self._tasks:
            # Followed by another supervisor process: signal its trainer; that supervisor records `cancelled`.
            await stop_trainer(job, self.settings)
        return await self.wait(job_id)

    async def cancel_member(self, member_id: str, actor: str) -> list[Job]:
        """Cancel every active job of a member (used before erasing them)."""
        return [
            await self.cancel(j.id, actor)
            for j in await self.jobs.recent(member_id=member_id)
            if not j.status.final
        ]

    async def get(self, job_id: str) -> Job:
        """A job by id (JobNotFoundError when unknown)."""
        return await self._get(job_id)

    async def _get(self, job_id: str) -> Job:
        job = await self.jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id}")
        return job

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """Yield the job each time its status or progress changes, ending once it is final or interrupted."""
        last: tuple[Any, ...] | None = None
        while True:
            pulse = self._pulse
            job = await self._get(job_id)
            key = (job.status, job.progress.step, job.progress.phase, job.progress.loss, job.heartbeat_at)
            if key != last:
                last = key
                yield job
            if job.status.final or job.status == JobStatus.INTERRUPTED:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pulse.wait(), timeout=POLL_S)

    async def wait(self, job_id: str, on_update: Callable[[Job], Any] | None = None) -> Job:
        """Block until the job is final or interrupted; `on_update` sees every change on the way."""
        job = await self._get(job_id)
        async for job in self.watch(job_id):
            if on_update is not None:
                result = on_update(job)
                if asyncio.iscoroutine(result):
                    await result
        return job

    async def materialize(self, job: Job, job_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Write the job's dataset into its folder (parent side: the child never opens the database)."""
        from jobs.dataset import materialize

        chat = await asyncio.to_thread(chat_format_for, config)
        multi = bool(job.config.get("_multi"))
        return await materialize(
            self.store,
            self.settings,
            job.member_id or "",
            job_dir,
            chat,
            job.mode,
            multi,
            reaction_weighting=self.settings.dataset.reaction_weighting,
            shots=int(config.get("example_shots") or 0),
            style=str(config.get("prompt_style") or DEFAULT_STYLE),
        )

    # -- what a JobRunner may ask of its host (jobs.runner.JobHost) ---------------------------------------------
    def cancelled_by(self, job_id: str) -> str | None:
        """Who asked to cancel `job_id` through this supervisor, if anyone."""
        return self._cancelled.get(job_id)

    @property
    def closing(self) -> bool:
        """True once `close()` began: a runner that has not launched yet must not start its trainer."""
        return self._closing

    def attach(self, job_id: str, run: Run) -> None:
        """Record a launched trainer, so cancel() and close() can stop it."""
        self._runs[job_id] = run

    def changed(self) -> None:
        """Wake the watchers and the queue: a job's row changed."""
        self._poke()

    async def prepare_serving(self, member_id: str | None) -> dict[str, Any]:
        """Build the new persona's retrieval index before it goes live; its cost, or why it was not built."""
        if not member_id:
            return {}
        try:
            if self._serving is None:
                from inference.retrieval import Retriever

                self._serving = Retriever(self.store, self.settings)
            return dict(await self._serving.prepare(member_id))
        except ImportError as exc:
            return {"error": f"the retrieval persona is not installed ({exc.name})"}
        except UserFacingError as exc:
            # The persona still publishes: the adapter serves alone, and the index is built on its first reply.
            log.warning("serving preparation for %s failed: %s", member_id, exc)
            return {"error": str(exc)}

    # -- queue ------------------------------------------------------------------------------------------------
    def _poke(self) -> None:
        self._pulse.set()
        self._pulse = asyncio.Event()

    async def _freed_before_turn(self, device: str) -> int:
        """Estimated memory that running jobs on `device` hold now and will have released when a new job starts."""
        held = sorted(
            int(job.config.get("_preflight_mem_bytes") or 0)
            for job in await self.jobs.with_status(JobStatus.RUNNING)
            if job.device == device
        )
        # It starts when fewer than `jobs_per_device` run; the ones still running then may be the largest.
        return sum(held[: max(0, len(held) - self.settings.training.jobs_per_device + 1)])

    async def _pick_device(self) -> str:
        load = {d: 0 for d in self.devices()}
        for job in await self.jobs.with_status(JobStatus.QUEUED, JobStatus.RUNNING):
            if job.device in load:
                load[job.device] += 1
        return min(load, key=lambda d: (load[d], list(load).index(d)))

    async def _schedule(self) -> None:
        while not self._closing:
            pulse = self._pulse
            try:
                for job in await self.jobs.with_status(JobStatus.QUEUED):
                    if job.supervisor_pid != self.pid or job.id in self._tasks:
                        continue
                    slots = self.settings.training.jobs_per_device
                    if await self.jobs.claim_slot(job.id, job.device, slots, self.pid, time.time()):
                        self._tasks[job.id] = asyncio.create_task(self._follow(job.id), name=f"job-{job.id}")
            except Exception:
                log.exception("supervisor queue pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pulse.wait(), timeout=POLL_S)

    # -- one job ----------------------------------------------------------------------------------------------
    async def _follow(self, job_id: str) -> None:
        from jobs.runner import JobRunner

        try:
            await JobRunner(self, job_id).run()
        except Exception:
            # Last resort (the runner ends its job itself): a crashed follower must not leave it "running".
            error_id = uuid.uuid4().hex[:8]
            log.exception("following job %s failed (error id %s)", job_id, error_id)
            with contextlib.suppress(Exception):
                if await self.jobs.transition(
                    job_id,
                    (JobStatus.RUNNING,),
                    JobStatus.FAILED,
                    error=f"the supervisor lost track of this job (error id {error_id} in its log)",
                    finished_at=time.time(),
                ):
                    # The folder holds the member's plaintext dataset: a failed job keeps none of it.
                    remove_job_dir((await self._get(job_id)).job_dir)
        finally:
            self._tasks.pop(job_id, None)
            self._runs.pop(job_id, None)
            self._cancelled.pop(job_id, None)
            self._poke()


def _conflict_message(job: Job) -> str:
    who = job.member_id or "the multi-persona adapter"
    if job.status == JobStatus.INTERRUPTED:
        return (
            f"{who} has an interrupted job {job.id} (step {job.progress.step}): resume it with "
            f"`doppel train {job.member_id or ''} --resume` or cancel it with `doppel train --cancel {job.id}`"
        )
    return f"{who} already has a {job.status.value} job {job.id} (requested by {job.requested_by})"


def chat_format_for(config: dict[str, Any]) -> Any:
    """The chat format of the base being trained (`ChatFormat.for_config`); a bad base is a SupervisorError."""
    from core.chatformat import ChatFormat

    try:
        return ChatFormat.for_config(config)
    except ValueError as exc:
        raise SupervisorError(str(exc)) from None
