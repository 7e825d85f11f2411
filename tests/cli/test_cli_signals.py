"""`doppel train` stopped by SIGTERM or SIGKILL: its trainer child goes with it, and the job resumes to an adapter."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DOPPEL_HOME": str(home),
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        "DOPPEL_TRAINING__CANCEL_GRACE_S": "30",
    }


def _train_args(tiny_model: Any, steps: int) -> list[str]:
    out = ["train", fx.PERSONA_ID, "--max-steps", str(steps)]
    # No periodic checkpoints: the only one is the one the trainer writes when told to stop, so resuming from it
    # shows the trainer stopped cleanly rather than dying on a broken pipe.
    for key, value in fx.tiny_overrides(tiny_model, save_steps=10_000).items():
        if key != "max_steps":
            out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def _job_row(settings: Any) -> dict[str, Any] | None:
    conn = sqlite3.connect(settings.db_path)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT id, status, pid, progress_json FROM jobs ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return dict(row) if row else None


def _wait_for_training(settings: Any, min_step: int, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _job_row(settings)
        if row and row["pid"] and json.loads(row["progress_json"] or "{}").get("step", 0) >= min_step:
            return row
        time.sleep(0.2)
    raise AssertionError(f"the job never reached step {min_step}: {_job_row(settings)}")


def _start_cli(args: list[str], env: dict[str, str], background: bool, err: Path) -> tuple[int, Any]:
    """The CLI started directly, or as a shell script's `cmd &` does (SIGINT then inherited as ignored)."""
    argv = [sys.executable, "-m", "doppel", *args]
    if not background:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True)
        return proc.pid, proc
    # A non-interactive shell has no job control: its background jobs ignore SIGINT (and SIGQUIT).
    script = '"$@" 2>"$0" >/dev/null & echo $!; wait $!'
    shell = subprocess.Popen(
        ["bash", "-c", script, str(err), *argv], env=env, stdout=subprocess.PIPE, text=True
    )
    assert shell.stdout is not None
    return int(shell.stdout.readline()), shell


def _sigint_ignored(pid: int) -> bool:
    # `echo $!` can run before the forked shell has set SIGINT ignored and exec'd the CLI: read the mask after exec.
    # Before exec the forked shell's argv is the shell's own, which names doppel too: wait for python's argv[0].
    deadline = time.monotonic() + 10
    while (
        Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != sys.executable.encode()
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


@pytest.mark.parametrize(
    ("signum", "background"),
    [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGTERM, True)],
    ids=["sigterm", "sigkill", "sigterm-from-a-script's-&"],
)
def test_the_trainer_ends_with_its_cli_and_the_job_resumes(
    doppel_home: Path, settings: Any, tiny_model: Any, signum: int, background: bool, tmp_path: Path
) -> None:
    asyncio.run(fx.seed_member(settings))
    err_file = tmp_path / "cli.err"
    # Slow enough steps (many of them) that the kill lands mid-training, after a checkpoint.
    pid, cli = _start_cli(_train_args(tiny_model, 120), _env(doppel_home), background, err_file)
    try:
        if background:
            assert _sigint_ignored(pid), "the shell did not start the CLI with SIGINT ignored"
        row = _wait_for_training(settings, min_step=3)
        child, killed_at = int(row["pid"]), json.loads(row["progress_json"])["step"]
        os.kill(pid, signum)
        cli.wait(timeout=60)
        assert fx.process_gone(child, within=10), "the trainer child outlived its supervisor"
    finally:
        if cli.poll() is None:
            os.kill(pid, signal.SIGKILL)
            cli.kill()
    err = err_file.read_text()
    if signum == signal.SIGTERM:
        assert cli.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
        assert _job_row(settings)["status"] == "interrupted"  # type: ignore[index]
    # The checkpointed job continues where it stopped and publishes an adapter.
    resumed = subprocess.run(
        [sys.executable, "-m", "doppel", "train", fx.PERSONA_ID, "--resume", "--json"],
        env=_env(doppel_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (
        result["job"]["id"] == row["id"] and result["job"]["status"] == "succeeded" and result["adapter_id"]
    )
    progress = json.loads(_job_row(settings)["progress_json"])  # type: ignore[index]
    assert progress["resumed_from"] >= killed_at, (
        "resumed from the checkpoint written when the trainer stopped"
    )


@pytest.fixture(scope="module")
def slow_step_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random llama wide enough that one optimizer step of the job below takes seconds on one thread."""
    from trainer.tinymodel import build_tiny

    return build_tiny(tmp_path_factory.mktemp("wide"), hidden=512, layers=8, heads=8, kv_heads=2)


def _checkpoints(settings: Any, job_id: str) -> list[int]:
    folder = settings.jobs_dir / job_id / "checkpoints"
    return sorted(
        int(p.name[11:]) for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )


def test_sigterm_mid_step_ends_the_step_and_resumes_from_the_last_finished_one(
    doppel_home: Path, settings: Any, slow_step_model: Any, tmp_path: Path
) -> None:
    """`doppel train ... &` from a script, SIGTERM at a random point of a seconds-long step: gone within Docker's
    10 s grace, without finishing the step (its checkpoint is the step before), and `--resume` ends in an adapter."""
    import random

    asyncio.run(fx.seed_member(settings, exchanges=144))
    err_file = tmp_path / "cli.err"
    # 36 micro-batches of 4 examples an optimizer step (about an epoch of this member's examples): seconds a step.
    args = ["train", fx.PERSONA_ID, "--max-steps", "3"]
    for key, value in fx.tiny_overrides(slow_step_model, save_steps=10_000, grad_accum=36).items():
        if key != "max_steps":
            args += ["--set", f"{key}={json.dumps(value)}"]
    pid, cli = _start_cli(args, _env(doppel_home), True, err_file)
    seed = random.randrange(2**32)
    try:
        assert _sigint_ignored(pid), "the shell did not start the CLI with SIGINT ignored"
        row = _wait_for_training(settings, min_step=1)
        progress = json.loads(row["progress_json"])
        step_s = progress["eta_s"] / max(progress["total"] - progress["step"], 1)
        # Anywhere in the first half of the next step, well clear of its end (the row may lag its event a little).
        time.sleep(random.Random(seed).uniform(0.05, 0.5) * step_s)
        killed_at = json.loads(_job_row(settings)["progress_json"])["step"]  # type: ignore[index]
        child = int(row["pid"])
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        child_gone = fx.process_gone(child, within=10)
        child_s = time.monotonic() - sent
        cli.wait(timeout=10)
        cli_s = time.monotonic() - sent
    finally:
        if cli.poll() is None:
            os.kill(pid, signal.SIGKILL)
            cli.kill()
    print(f"step {step_s:.1f} s, seed {seed}: trainer gone {child_s:.2f} s, CLI {cli_s:.2f} s after SIGTERM")
    assert child_gone and cli_s <= 10, f"trainer {child_s:.1f} s, CLI {cli_s:.1f} s (seed {seed})"
    err = err_file.read_text()
    assert cli.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    job_id = str(row["id"])
    assert _job_row(settings)["status"] == "interrupted"  # type: ignore[index]
    # The step under way was dropped, not finished: the only checkpoint is the last finished step's.
    assert _checkpoints(settings, job_id) == [killed_at], (_checkpoints(settings, job_id), killed_at, seed)
    resumed = subprocess.run(
        [sys.executable, "-m", "doppel", "train", fx.PERSONA_ID, "--resume", "--json"],
        env=_env(doppel_home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["job"]["id"] == job_id and result["job"]["status"] == "succeeded" and result["adapter_id"]
    final = json.loads(_job_row(settings)["progress_json"])  # type: ignore[index]
    assert final["resumed_from"] == killed_at and final["step"] == 3, final


def _wait_for_phase(settings: Any, phases: tuple[str, ...], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _job_row(settings)
        if row and row["pid"] and json.loads(row["progress_json"] or "{}").get("phase") in phases:
            return row
        time.sleep(0.02)
    raise AssertionError(f"the job never reached {phases}: {_job_row(settings)}")


@pytest.mark.parametrize("phase", ["exporting", "evaluating"])
def test_sigterm_after_training_keeps_the_trained_adapter_and_the_trainer_is_gone_within_the_grace(
    doppel_home: Path, settings: Any, slow_step_model: Any, phase: str, tmp_path: Path
) -> None:
    """SIGTERM once training is over (during the export, or the evaluation, which takes minutes on a real base):
    the trainer does not finish the evaluation first; the trained adapter is kept as a candidate to evaluate later."""
    asyncio.run(fx.seed_member(settings, exchanges=144))
    err_file = tmp_path / "cli.err"
    # An evaluation of many seconds: every held-out example scored one by one, twice, then generations.
    slow_eval = {"eval_max_examples": 0, "eval_batch_size": 1, "eval_samples": 8, "eval_max_new_tokens": 64}
    args = ["train", fx.PERSONA_ID, "--max-steps", "1"]
    for key, value in fx.tiny_overrides(slow_step_model, **slow_eval).items():
        if key != "max_steps":
            args += ["--set", f"{key}={json.dumps(value)}"]
    pid, cli = _start_cli(args, _env(doppel_home), True, err_file)
    try:
        assert _sigint_ignored(pid), "the shell did not start the CLI with SIGINT ignored"
        # The export of a small adapter takes a moment: a signal meant for it may land early in the evaluation.
        row = _wait_for_phase(settings, ("exporting", "evaluating") if phase == "exporting" else (phase,))
        if phase == "evaluating":
            time.sleep(1.0)  # well inside the evaluation
        child = int(row["pid"])
        sent = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        child_gone = fx.process_gone(child, within=10)
        child_s = time.monotonic() - sent
        cli.wait(timeout=10)
        cli_s = time.monotonic() - sent
    finally:
        if cli.poll() is None:
            os.kill(pid, signal.SIGKILL)
            cli.kill()
    print(f"{phase}: trainer gone {child_s:.2f} s, CLI {cli_s:.2f} s after SIGTERM")
    assert child_gone and cli_s <= 10, f"trainer {child_s:.1f} s, CLI {cli_s:.1f} s"
    err = err_file.read_text()
    assert "Traceback" not in err, err[-2000:]
    job = _job_row(settings)
    assert job is not None and job["id"] == row["id"]
    conn = sqlite3.connect(settings.db_path)
    try:
        adapters = conn.execute(
            "SELECT status, metrics_json FROM adapters WHERE job_id = ?", (job["id"],)
        ).fetchall()
    finally:
        conn.close()
    # Kept, not lost and not trained again: a candidate whose evaluation is still to be done (`doppel eval`).
    assert job["status"] == "succeeded" and len(adapters) == 1 and adapters[0][0] == "candidate", (
        job,
        adapters,
    )
    assert "stopped during evaluation" in (adapters[0][1] or "") + err, (adapters, err[-1000:])
