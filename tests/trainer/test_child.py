"""`python -m trainer run JOB_DIR` as the supervisor runs it: a subprocess, JSON lines on stdout, exit codes, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _spawn(job: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "run", str(job), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _events(stdout: str) -> list[dict[str, Any]]:
    # Every stdout line must be one JSON event: library chatter belongs on stderr.
    return [json.loads(line) for line in stdout.splitlines()]


def test_bad_config_exits_1_with_one_failed_event_and_no_traceback(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.json").write_text(json.dumps({"base_model": "x", "mode": "rlhf"}), encoding="utf-8")
    proc = _spawn(job)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert _events(out) == [
        {
            **_events(out)[0],
            "event": "finished",
            "status": "failed",
            "error": "mode must be one of sft, sft+kto, sft+dpo, got 'rlhf'",
        }
    ]
    assert "Traceback" not in err


def test_missing_job_folder_fails_cleanly(tmp_path: Path) -> None:
    proc = _spawn(tmp_path / "nope")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    assert _events(out)[-1]["error"].startswith("job folder not found")


@pytest.mark.slow
def test_sigterm_stops_with_the_last_finished_step_saved_and_resume_continues(
    make_job: Callable[..., Path],
) -> None:
    job = make_job(max_steps=40, save_steps=50, eval_samples=0, eval_fidelity=False, learning_rate=3e-3)
    proc = _spawn(job)
    assert proc.stdout is not None
    first: list[dict[str, Any]] = []
    for line in proc.stdout:
        first.append(json.loads(line))
        if first[-1]["event"] == "progress" and first[-1]["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    first += _events(rest)
    assert proc.returncode == 143, err[-2000:]
    assert first[-1]["event"] == "finished" and first[-1]["status"] == "cancelled"
    stopped = max(e["step"] for e in first if e["event"] == "progress")
    assert 3 <= stopped < 40
    # Cancellation saves a checkpoint at the step it stopped at even though save_steps was not reached.
    assert (job / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    assert not (job / "output").exists()

    proc = _spawn(job, "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    second = _events(out)
    started = [e for e in second if e["event"] == "started"][0]
    assert started["resumed_from_step"] == stopped
    steps = [e["step"] for e in second if e["event"] == "progress"]
    assert steps == list(range(stopped + 1, 41))
    before = [e["loss"] for e in first if e["event"] == "progress"]
    after = [e["loss"] for e in second if e["event"] == "progress"]
    # The loss continues from where it was, not from the untrained model's loss.
    assert after[0] < before[0] - 0.2 and abs(after[0] - before[-1]) < 0.6
    assert second[-1] == {**second[-1], "event": "finished", "status": "succeeded"}
    meta = json.loads((job / "output" / "adapter" / "meta.json").read_text())
    assert meta["training"]["sft"]["steps"] == 40 and meta["training"]["sft"]["resumed_from_step"] == stopped
    assert [s for s, _ in meta["losses"]["sft"]] == list(range(1, 41))


def test_train_config_round_trips_and_rejects_bad_fields(tmp_path: Path) -> None:
    import dataclasses

    from jobspec.config import TrainConfig
    from jobspec.errors import JobConfigError

    cfg = TrainConfig(member_id="1", base_model="m.gguf", target_modules=["q_proj"], max_steps=7)
    cfg.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json") == cfg
    assert all(TrainConfig.help()[f.name] for f in dataclasses.fields(TrainConfig))
    for bad, message in (
        ({"base_model": "m", "max_stepz": 3}, "unknown config field(s): max_stepz"),
        ({"base_model": "m", "max_steps": "3"}, "config field max_steps: expected int, got '3'"),
        ({"base_model": "m", "lora_dropout": 1.5}, "lora_dropout must be in [0, 1), got 1.5"),
        (
            {"base_model": "m", "batching": "packed"},
            "batching must be one of padding_free, length_grouped, random",
        ),
        ({}, "base_model is empty"),
    ):
        with pytest.raises(JobConfigError) as err:
            TrainConfig.from_dict(bad)
        assert str(err.value).startswith(message)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(JobConfigError, match="invalid JSON"):
        TrainConfig.from_json(tmp_path / "broken.json")


def test_config_from_settings_takes_training_defaults(settings: Any) -> None:
    import dataclasses

    from jobspec.config import DEFAULT_PRESET, PRESETS, TrainConfig

    cfg = TrainConfig.from_settings(settings, member_id="42", base_model="/m.gguf", max_steps=5)
    preset = PRESETS[DEFAULT_PRESET]
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate, cfg.max_steps, cfg.member_id) == (
        preset["lora_r"],
        preset["lora_alpha"],
        preset["learning_rate"],
        5,
        "42",
    ), "settings left at 0 take the preset's recipe"
    ranked = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, lora_r=8, lora_alpha=8)
    )
    mine = TrainConfig.from_settings(ranked, member_id="42", base_model="/m.gguf")
    assert (mine.lora_r, mine.lora_alpha) == (8, 8), "an operator's [training] values win"
    assert cfg.base_cache_dir == str(settings.cache_dir / "base-models")
