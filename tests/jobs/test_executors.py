"""Executors: the local subprocess details, and the Ray path against a real local Ray head on loopback."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx


def test_parse_event_keeps_only_event_objects() -> None:
    from jobs.executors.base import parse_event

    assert parse_event('{"event": "progress", "step": 3}\n') == {"event": "progress", "step": 3}
    assert parse_event("Some library printed this") is None
    assert parse_event('{"no_event": 1}') is None
    assert parse_event("{broken json") is None


def test_device_env_pins_one_gpu_or_none() -> None:
    from jobs.executors.local import device_env

    assert device_env("cuda:1", {})["CUDA_VISIBLE_DEVICES"] == "1"
    assert device_env("cpu", {"CUDA_VISIBLE_DEVICES": "0"})["CUDA_VISIBLE_DEVICES"] == ""


def test_classify_covers_every_ending() -> None:
    from jobs.endings import classify
    from jobs.executors.base import Outcome

    ok = {"event": "finished", "status": "succeeded"}
    assert classify(Outcome(0), ok)[0].value == "succeeded"
    status, why = classify(Outcome(-9, signal=9), None)
    assert status.value == "failed" and why.startswith("the trainer was killed from outside (SIGKILL")
    failed = classify(Outcome(1), {"event": "finished", "status": "failed", "error": "not enough examples"})
    assert failed[0].value == "failed" and failed[1] == "not enough examples"
    crashed = classify(Outcome(1, stderr_tail=["Traceback", "ValueError: boom"]), None)
    assert crashed[1] == "the trainer stopped with exit code 1 before it finished: ValueError: boom"
    # Exit 0 without a `finished` event is not a success: the adapter was never announced.
    assert classify(Outcome(0), None)[0].value == "failed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A real Ray head on loopback with one CPU, in a short temp dir; stopped afterwards."""
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        pytest.skip("ray is not installed in this environment")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port, dash = _free_port(), _free_port()
    cmd = [
        str(ray),
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=1",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    try:
        if started.returncode != 0:
            pytest.skip(
                f"ray cannot start here: {(started.stderr or started.stdout).strip().splitlines()[-1:]}"
            )
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@fx.run_async
async def test_ray_executor_runs_the_trainer_and_brings_the_adapter_back(
    doppel_home: Path, tiny_model: Any, ray_head: str
) -> None:
    from core.settings import Settings
    from data.store import Store
    from jobs.supervisor import Supervisor

    settings = Settings.load(
        env={
            "DOPPEL_HOME": str(doppel_home),
            "DOPPEL_TRAINING__EXECUTOR": "ray",
            "DOPPEL_TRAINING__RAY_ADDRESS": ray_head,
            "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
            "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        }
    )
    await fx.seed_member(settings)
    async with Store.open(settings) as store:
        sup = Supervisor(store, settings)
        await sup.start()
        try:
            job = await sup.submit(fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model))
            done = await sup.wait(job.id)
            assert done.status.value == "succeeded", (done.error, done.exit_detail)
            assert done.executor == "ray" and done.executor_ref.startswith(f"doppel-{job.id}-")
            assert done.pid is None
            assert done.progress.step == 6 and done.progress.losses, (
                "events were streamed back from Ray's logs"
            )
            version = await sup.registry.get(done.adapter_id)
            assert version.gguf_path.is_file() and version.job_id == job.id
            assert not Path(job.job_dir).exists()
        finally:
            await sup.close()
    assert fx.integrity(settings) == "ok"


def test_stop_never_signals_our_own_process_group() -> None:
    from jobs.executors import signal_trainer

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # same process group as us
    try:
        assert signal_trainer(proc.pid, signal.SIGTERM) is True
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert signal_trainer(proc.pid, signal.SIGTERM) is False  # gone
    finally:
        if proc.poll() is None:
            proc.kill()


def test_stop_trainer_leaves_a_pid_alone_unless_it_runs_the_jobs_folder(
    settings: Any, tmp_path: Path
) -> None:
    from jobs.executors import stop_trainer
    from jobs.table import Job

    job_dir = tmp_path / "jobs" / "j1"
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    procs: list[subprocess.Popen[bytes]] = []

    def job(pid: int) -> Job:
        return Job(id="j1", member_id="1", requested_by="t", source="cli", job_dir=str(job_dir), pid=pid)

    try:
        # The row's pid now belongs to another program (pid reuse after a crash): it must survive.
        procs.append(stranger := subprocess.Popen(sleeper, start_new_session=True))
        assert asyncio.run(stop_trainer(job(stranger.pid), settings)) is False
        assert stranger.poll() is None
        # Each trainer is signalled the moment it is spawned: erasure can race a job start, and a child still
        # inside exec reads an empty command line, which means "not yet", not "a stranger".
        for _ in range(10):
            procs.append(trainer := subprocess.Popen([*sleeper, str(job_dir)], start_new_session=True))
            assert asyncio.run(stop_trainer(job(trainer.pid), settings)) is True
            assert trainer.wait(timeout=10) == -signal.SIGTERM
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
