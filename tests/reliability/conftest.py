"""Reliability fixtures: the tiny trainable model (built once) and the control-plane helpers of tests/trainer."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def fx() -> Any:
    """The control-plane helpers shared with the trainer tests."""
    from tests.helpers import supervision

    return supervision


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny random llama the trainer tests use: `.hf_dir` and `.gguf_path`."""
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tiny"))
