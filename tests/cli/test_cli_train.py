"""`doppel train`, `doppel personas`, `doppel doctor` as a person runs them: a subprocess, real store, tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import supervision as fx


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def doppel(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DOPPEL_HOME": str(home),
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
    }
    return subprocess.run(
        [sys.executable, "-m", "doppel", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _set_args(tiny_model: Any) -> list[str]:
    out = []
    for key, value in fx.tiny_overrides(tiny_model).items():
        if key != "max_steps":
            out += ["--set", f"{key}={json.dumps(value)}"]
    return out


@pytest.mark.timeout(300)
def test_train_prints_progress_and_the_adapter_then_personas_lists_it(
    doppel_home: Path, settings: Any, tiny_model: Any
) -> None:
    asyncio.run(fx.seed_member(settings))
    done = doppel(doppel_home, "train", fx.PERSONA_ID, "--max-steps", "4", *_set_args(tiny_model), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == 1 and result["job"]["status"] == "succeeded" and result["adapter_id"]
    assert "step 4/4" in done.stderr and "%" in done.stderr, "a progress bar on stderr"
    assert "Traceback" not in done.stderr

    listed = doppel(doppel_home, "personas", "--json")
    assert listed.returncode == 0, listed.stderr
    adapters = json.loads(listed.stdout.strip().splitlines()[-1])["adapters"]
    assert [(a["member_id"], a["version"], a["id"]) for a in adapters] == [
        (fx.PERSONA_ID, 1, result["adapter_id"])
    ]
    human = doppel(doppel_home, "personas")
    assert fx.PERSONA_ID in human.stdout and "v1" in human.stdout

    jobs = doppel(doppel_home, "train", "--jobs", "--json")
    assert json.loads(jobs.stdout.strip().splitlines()[-1])["jobs"][0]["status"] == "succeeded"
    rolled = doppel(doppel_home, "personas", "rollback", fx.PERSONA_ID, "1", "--json")
    assert rolled.returncode == 0 and json.loads(rolled.stdout.splitlines()[-1])["status"] == "active"
    assert fx.integrity(settings) == "ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train"], "name the member to train"),
        (["train", "not-an-id"], "is not a Discord user id"),
        (["train", "1001", "--set", "no_such_field=1"], "unknown config field(s): no_such_field"),
        (["train", "1001", "--max-steps", "-3"], "--max-steps must be 0 or more"),
        (["train", "1001", "--base", "missing"], "no base model named 'missing'"),
        (["train", "--cancel", "nojob"], "no job nojob"),
        (["personas", "rollback", "1001", "4"], "has no adapter version 4"),
        (["personas", "add-base", "x", "/nonexistent.gguf"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(doppel_home: Path, args: list[str], message: str) -> None:
    done = doppel(doppel_home, *args, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("doppel: error:") and message in lines[0], done.stderr
    assert not (doppel_home / "jobs").exists() or not any((doppel_home / "jobs").iterdir())


def test_train_without_enough_data_fails_cleanly(doppel_home: Path, settings: Any) -> None:
    asyncio.run(fx.seed_member(settings, exchanges=3))
    done = doppel(doppel_home, "train", fx.PERSONA_ID, "--max-steps", "2")
    assert done.returncode == 2
    assert "failed: member 1001 has" in done.stderr and "Traceback" not in done.stderr
    assert not any((doppel_home / "jobs").iterdir()), "the job folder is removed"


def test_doctor_reports_the_host_checks(doppel_home: Path) -> None:
    done = doppel(doppel_home, "doctor", "--json", timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[0])
    names = {c["name"] for c in report["checks"]}
    assert {"disk", "executor", "package torch"} <= names
    assert done.returncode == (0 if report["ok"] else 2)
