"""Published-like adapter folders for serving tests: a random LoRA GGUF and the meta.json that names its base."""

from __future__ import annotations

import json
from pathlib import Path

from models.catalog import file_sha256


def adapter_on(base: Path, folder: Path, seed: int, *, name: str, sha: str | None = None) -> str:
    """Write `folder/adapter.gguf` (a random LoRA for `base`) and a meta.json recording that base; its path."""
    from inference.synthetic import write_random_lora

    folder.mkdir(parents=True, exist_ok=True)
    gguf = write_random_lora(base, folder / "adapter.gguf", seed=seed, strength=0.3)
    meta = {
        "base_model": {"name": name, "path": str(base), "sha256": sha or file_sha256(base), "gguf": str(base)}
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return str(gguf)
