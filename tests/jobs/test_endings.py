"""How a trainer ended, in words: real trainer processes killed by each signal, and the memory wording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx

pytestmark = pytest.mark.timeout(300)
GIB = 1024**3


def _settings(doppel_home: Path) -> Any:
    from core.settings import Settings

    return Settings.load(env=fx.control_env(doppel_home))


async def _run_and_end(settings: Any, tiny_model: Any, signum: int | None, **extra: Any) -> Any:
    """Train a real job on the tiny model; once a step is done, send `signum` to the trainer (None: let it end)."""
    from data.store import Store
    from jobs.supervisor import Supervisor

    await fx.seed_member(settings)
    async with Store.open(settings) as store:
        sup = Supervisor(store, settings)
        await sup.start()
        try:
            job = await sup.submit(
                fx.PERSONA_ID, requested_by="admin", **fx.tiny_overrides(tiny_model, max_steps=400, **extra)
            )
            if signum is not None:

                async def running_pid() -> int | None:
                    j = await sup.get(job.id)
                    return j.pid if j.pid and j.progress.step >= 1 else None

                os.killpg(await fx.wait_for(running_pid), signum)
            return await sup.wait(job.id)
        finally:
            await sup.close()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOPPEL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "doppel", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    ("signum", "words"),
    [
        (signal.SIGILL, ["CPU instruction this machine cannot run (SIGILL)", "bash scripts/setup.sh"]),
        (signal.SIGKILL, ["killed from outside (SIGKILL", "its memory peaked at"]),
        (signal.SIGABRT, ["crashed in native code (SIGABRT)", "doppel train --job"]),
    ],
)
def test_a_trainer_killed_by_a_signal_says_why(
    doppel_home: Path, tiny_model: Any, signum: int, words: list[str]
) -> None:
    import asyncio

    done = asyncio.run(_run_and_end(_settings(doppel_home), tiny_model, signum))
    assert done.status.value == "failed"
    for word in words:
        assert word in done.error, done.error  # what the bot's end-of-training post shows
    name = signal.Signals(signum).name
    assert done.exit_detail.startswith(f"killed by signal {int(signum)} ({name}); peak RSS ")
    listed = _cli(doppel_home, "train", "--jobs")
    assert listed.returncode == 0 and words[0] in listed.stdout, listed.stdout
    shown = _cli(doppel_home, "train", "--job", done.id)
    assert shown.returncode == 0, shown.stderr
    assert f"why: {done.error}" in shown.stdout and f"killed by signal {int(signum)}" in shown.stdout
    as_json = json.loads(
        _cli(doppel_home, "train", "--job", done.id, "--json").stdout.strip().splitlines()[-1]
    )
    assert as_json["error"] == done.error and as_json["status"] == "failed"


def test_a_python_error_in_the_trainer_is_its_message(doppel_home: Path, tiny_model: Any) -> None:
    import asyncio

    done = asyncio.run(
        _run_and_end(_settings(doppel_home), tiny_model, None, target_modules=["no_such_proj"])
    )
    assert done.status.value == "failed"
    assert "no_such_proj" in done.error and "Traceback" not in done.error, done.error
    shown = _cli(doppel_home, "train", "--job", done.id)
    assert "no_such_proj" in shown.stdout


def test_memory_wording_tells_an_oom_kill_from_a_kill() -> None:
    from jobs.endings import MemoryFacts, explain
    from jobs.executors.base import Outcome

    killed = Outcome(-9, signal=9)
    oom = explain(killed, None, MemoryFacts(peak_rss=int(22.5 * GIB), limit=24 * GIB, estimate=3 * GIB))
    assert "probably by the kernel for running out of memory" in oom
    assert "22.5 GiB of 24.0 GiB" in oom and "pre-flight estimated 3.0 GiB" in oom and "max_length" in oom
    outside = explain(killed, None, MemoryFacts(peak_rss=1 * GIB, limit=24 * GIB))
    assert "killed from outside" in outside and "out of memory" not in outside
    # A shell-style exit code 128+N is read as signal N.
    assert "CPU instruction" in explain(Outcome(132), None)
    traceback_only = explain(
        Outcome(
            1,
            stderr_tail=[
                "Traceback (most recent call last):",
                "  File x",
                "RuntimeError: bad alloc",
                "  at exit",
            ],
        ),
        None,
    )
    assert traceback_only.endswith("RuntimeError: bad alloc")
