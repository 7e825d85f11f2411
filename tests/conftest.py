"""Shared fixtures: every test gets its own DOPPEL_HOME and never touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny model and job-folder factory, shared by tests/trainer (the child) and tests/jobs (the control plane).
pytest_plugins = ("tests.helpers.jobfolders",)


@pytest.fixture
def doppel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DOPPEL_HOME", str(home))
    monkeypatch.setenv("DOPPEL_MASTER_KEY", "")
    return home


@pytest.fixture
def settings(doppel_home: Path):
    from core.settings import Settings

    return Settings.load(env={"DOPPEL_HOME": str(doppel_home)})
