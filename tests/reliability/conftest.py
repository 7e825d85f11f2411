"""Reliability fixtures: the tiny trainable model (built once) and the control-plane helpers of tests/trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_HELPERS = Path(__file__).resolve().parents[1] / "trainer" / "supervision_fixtures.py"


@pytest.fixture(scope="session")
def fx() -> Any:
    """tests/trainer/supervision_fixtures.py, loaded by path (test folders are not packages)."""
    spec = importlib.util.spec_from_file_location("reliability_supervision_fixtures", _HELPERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny random llama the trainer tests use: `.hf_dir` and `.gguf_path`."""
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny"))
