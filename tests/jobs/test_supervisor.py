"""The supervisor against the real trainer child on the tiny model: success, SIGKILL, cancel, queue, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import supervision as fx

pytestmark = pytest.mark.timeout(300)


def _settings(doppel_home: Path, **training: Any) -> Any:
    from core.settings import Settings

    return Settings.load(env=fx.control_env(doppel_home, **{"cancel_grace_s": 20, **training}))


async def _open(settings: Any) -> tuple[Any, Any]:
    from data.store import Store
    from jobs.supervisor import Supervisor

    store = await Store.open(settings)
    sup = Supervisor(store, settings)
    await sup.start()
    return store, sup


@fx.run_async
async def test_job_succeeds_and_publishes_a_version(doppel_home: Path, tiny_model: Any) -> None:
    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    store, sup = await _open(settings)
    try:
        job = await sup.submit(
            fx.PERSONA_ID, requested_by="admin", source="cli", **fx.tiny_overrides(tiny_model)
        )
        assert job.status.value == "queued" and job.requested_by == "admin" and job.created_at > 0
        seen: list[str] = []
        done = await sup.wait(job.id, on_update=lambda j: seen.append(j.status.value))
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert "running" in seen
        assert done.progress.step == done.progress.total == 6 and done.progress.losses
        assert done.adapter_id and done.exit_detail.startswith("exit code 0")
        version = await sup.registry.get(done.adapter_id)
        assert version.version == 1 and version.member_id == fx.PERSONA_ID and version.job_id == job.id
        assert version.gguf_path.is_file() and (Path(version.path) / "meta.json").is_file()
        assert version.status in ("active", "candidate")
        assert fx.PERSONA_ID in version.lineage
        assert not Path(job.job_dir).exists(), "dataset and checkpoints are deleted when the job ends"
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


@fx.run_async
async def test_sigkill_of_the_trainer_fails_the_job_and_cleans_up(doppel_home: Path, tiny_model: Any) -> None:
    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    store, sup = await _open(settings)
    try:
        job = await sup.submit(
            fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model, max_steps=400)
        )

        async def running_pid() -> int | None:
            j = await sup.get(job.id)
            return j.pid if j.pid and j.progress.step >= 1 else None

        pid = await fx.wait_for(running_pid)
        os.killpg(pid, signal.SIGKILL)
        done = await sup.wait(job.id)
        assert done.status.value == "failed"
        assert done.error.startswith("the trainer was killed from outside (SIGKILL"), done.error
        assert done.exit_detail.startswith("killed by signal 9 (SIGKILL); peak RSS ")
        assert done.adapter_id is None and await sup.registry.list() == []
        assert fx.adapter_versions(settings) == []
        assert not Path(job.job_dir).exists()
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


@fx.run_async
async def test_a_failure_after_training_ends_the_job_instead_of_leaving_it_running(
    doppel_home: Path, tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    # Not a user-facing error: publishing cannot create the member's adapter folder (a file sits at that path).
    settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    (settings.adapters_dir / fx.PERSONA_ID).write_text("in the way")
    store, sup = await _open(settings)
    try:
        job = await sup.submit(fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model))
        done = await sup.wait(job.id)
        assert done.status.value == "failed"
        assert done.error.startswith("the supervisor failed after training (error id "), done.error
        assert "FileExistsError" in done.error and done.finished_at
        error_id = done.error.split("error id ")[1][:8]
        assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records), (
            "the log has the traceback"
        )
        assert done.adapter_id is None and not Path(job.job_dir).exists()
        # The store is still usable: the next job is accepted and recorded.
        (settings.adapters_dir / fx.PERSONA_ID).unlink()
        again = await sup.wait(
            (await sup.submit(fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model))).id
        )
        assert again.status.value == "succeeded", (again.error, again.exit_detail)
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


@fx.run_async
async def test_cancel_queue_and_one_job_per_member(doppel_home: Path, tiny_model: Any) -> None:
    from jobs.errors import JobConflictError

    settings = _settings(doppel_home, devices="cpu", jobs_per_device=1)
    await fx.seed_member(settings)
    await fx.seed_member(settings, member_id="4004", exchanges=30)
    store, sup = await _open(settings)
    try:
        first = await sup.submit(
            fx.PERSONA_ID, requested_by="a", **fx.tiny_overrides(tiny_model, max_steps=400)
        )
        with pytest.raises(JobConflictError, match="already has a"):
            await sup.submit(fx.PERSONA_ID, requested_by="b", **fx.tiny_overrides(tiny_model))
        second = await sup.submit("4004", requested_by="b", source="discord", **fx.tiny_overrides(tiny_model))

        async def first_training() -> bool:
            return (await sup.get(first.id)).progress.step >= 1

        await fx.wait_for(first_training)
        waiting = await sup.get(second.id)
        assert waiting.status.value == "queued", "the second job waits while the first holds the cpu slot"
        assert waiting.started_at is None

        cancelled = await sup.cancel(first.id, actor="admin")
        assert cancelled.status.value == "cancelled" and cancelled.error == "cancelled by admin"
        assert not Path(first.job_dir).exists()
        assert await sup.registry.list() == []

        done = await sup.wait(second.id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert done.started_at >= cancelled.finished_at - 0.01, "it only started once the slot was free"
        # The member whose job was cancelled can train again.
        again = await sup.submit(fx.PERSONA_ID, requested_by="a", **fx.tiny_overrides(tiny_model))
        assert (await sup.cancel(again.id, actor="a")).status.value == "cancelled"
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


def _sized(settings: Any, tiny_model: Any, share: float, odd: bool, **extra: Any) -> dict[str, Any]:
    """Tiny-model overrides whose memory estimate is about `share` of the RAM free now (by micro-batch size)."""
    from core.ggufinfo import read_shape
    from jobs.preflight import cpu_device
    from jobspec.config import TrainConfig
    from jobspec.memory import estimate_memory

    shape, target = read_shape(tiny_model.gguf_path), share * cpu_device().free_bytes

    def estimate(b: int) -> int:
        config = TrainConfig.from_settings(settings, **fx.tiny_overrides(tiny_model, micro_batch_size=b))
        return estimate_memory(shape, config, "cpu")

    lo, hi = 1, 2
    while estimate(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 2:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(mid) < target else (lo, mid)
    # An odd micro-batch cannot be split in halves, so the pre-flight can only accept or refuse it.
    size = hi + (hi % 2 == 0) if odd else hi + hi % 2
    return fx.tiny_overrides(tiny_model, micro_batch_size=size, **extra)


@fx.run_async
async def test_a_queued_job_is_judged_for_its_turn_and_fitted_again_when_it_starts(
    doppel_home: Path, tiny_model: Any
) -> None:
    settings = _settings(doppel_home, devices="cpu", jobs_per_device=1)
    for member, exchanges in ((fx.PERSONA_ID, 48), ("4004", 30), ("5005", 30)):
        await fx.seed_member(settings, member_id=member, exchanges=exchanges)
    store, sup = await _open(settings)
    try:
        first = await sup.submit(
            fx.PERSONA_ID, requested_by="a", **_sized(settings, tiny_model, 0.55, odd=True, max_steps=400)
        )

        async def first_training() -> bool:
            return (await sup.get(first.id)).progress.step >= 1

        await fx.wait_for(first_training)
        # Each needs more than is free while the first runs, and less than will be free once it has ended:
        # queued, not refused (a consumer GPU shared by two members' jobs is this case).
        halvable = _sized(settings, tiny_model, 1.3, odd=False)
        second = await sup.submit("4004", requested_by="b", **halvable)
        assert second.config["micro_batch_size"] == halvable["micro_batch_size"], "fits its turn as asked"
        third = await sup.submit("5005", requested_by="c", **_sized(settings, tiny_model, 1.3, odd=True))
        assert (await sup.get(third.id)).status.value == "queued"

        await sup.cancel(first.id, actor="admin")
        # When its turn comes the RAM free is what it is: the second runs in half-size micro-batches (the same
        # optimizer step), the third cannot fit at all and fails before anything is written.
        done = await sup.wait(second.id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert done.config["micro_batch_size"] < halvable["micro_batch_size"]
        assert done.config["micro_batch_size"] * done.config["grad_accum"] == halvable["micro_batch_size"]
        refused = await sup.wait(third.id)
        assert refused.status.value == "failed" and refused.exit_detail == "not started"
        assert refused.error.startswith("memory: needs about "), refused.error
        assert "cpu has" in refused.error and "once the jobs ahead end" not in refused.error
        assert "(fix: lower micro_batch_size (now " in refused.error
        assert refused.adapter_id is None and not Path(refused.job_dir).exists()
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


@pytest.mark.slow
@fx.run_async
async def test_supervisor_killed_mid_run_then_resume_continues_from_checkpoint(
    doppel_home: Path, tiny_model: Any
) -> None:
    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    env = {
        "DOPPEL_HOME": str(doppel_home),
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
        "DOPPEL_TRAINING__CANCEL_GRACE_S": "20",
    }
    overrides = fx.tiny_overrides(tiny_model, max_steps=30, save_steps=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", fx.SUPERVISOR_SCRIPT, json.dumps(env), json.dumps(overrides), fx.PERSONA_ID],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = proc.stdout.readline().strip()  # type: ignore[union-attr]
        from data.store import Store
        from jobs.table import JobTable

        async with Store.open(settings) as store:
            jobs = JobTable(store)

            async def checkpointed() -> Any:
                j = await jobs.get(job_id)
                ckpt = Path(j.job_dir) / "checkpoints"
                return (
                    j if j.progress.step >= 3 and ckpt.is_dir() and any(ckpt.glob("checkpoint-*")) else None
                )

            before = await fx.wait_for(checkpointed)
            proc.kill()
            proc.wait()
            trainer_pid = before.pid
            assert trainer_pid and before.status.value == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fx.integrity(settings) == "ok"

    store, sup = await _open(settings)  # a new supervisor: start() recovers the orphaned job
    try:
        job = await sup.get(job_id)
        assert job.status.value == "interrupted" and job.exit_detail == "lost at restart"
        assert "resume" in job.error
        # The orphaned trainer was stopped (it checkpoints on SIGTERM); a zombie awaiting its reaper counts as gone.
        assert (
            not psutil.pid_exists(trainer_pid) or psutil.Process(trainer_pid).status() == psutil.STATUS_ZOMBIE
        )
        assert any((Path(job.job_dir) / "checkpoints").glob("checkpoint-*")), "kept for resume"
        await sup.resume(job_id)
        done = await sup.wait(job_id)
        assert done.status.value == "succeeded", (done.error, done.exit_detail)
        assert done.progress.resumed_from >= 2, "the trainer continued from the last checkpoint"
        version = await sup.registry.get(done.adapter_id)
        assert version.meta["training"]["sft"]["resumed_from_step"] == done.progress.resumed_from
        assert not Path(job.job_dir).exists()
    finally:
        await sup.close()
        await store.close()
    assert fx.integrity(settings) == "ok"


@fx.run_async
async def test_example_shots_reach_the_jobs_dataset(doppel_home: Path, tiny_model: Any) -> None:
    """A job asking to train as the hybrid persona is served gets those prompts written in its folder."""
    from core.chatformat import EXAMPLE_CUE
    from data.crypto import job_key_for
    from jobs.table import Job
    from jobspec.jobdata import load_job_data

    settings = _settings(doppel_home)
    await fx.seed_member(settings)
    store, sup = await _open(settings)
    try:
        config = fx.tiny_overrides(tiny_model, example_shots=2)
        job = Job(id="jshots", member_id=fx.PERSONA_ID, requested_by="t", source="cli")
        written = {}
        for shots in (0, 2):
            job_dir = doppel_home / "jobs" / f"shots{shots}"
            await sup.materialize(job, job_dir, {**config, "example_shots": shots})
            written[shots] = load_job_data(job_dir, job_key_for(settings, job_dir))
        assert all(EXAMPLE_CUE not in row["prompt"] for row in written[0].train)
        assert all(row["prompt"].count(EXAMPLE_CUE) == 2 for row in written[2].train)
        assert [r["prompt"] for r in written[2].heldout] == [r["prompt"] for r in written[0].heldout]
    finally:
        await sup.close()
        await store.close()
