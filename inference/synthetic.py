"""Random-but-nonzero LoRA adapters in llama.cpp's GGUF format, for tests and the benchmark (no trainer needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

TARGETS = ("attn_q", "attn_v", "attn_output")


def _targets(base_gguf: Path, targets: tuple[str, ...]) -> tuple[str, list[tuple[str, int, int]]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(base_gguf))
    arch = str(reader.fields["general.architecture"].contents())
    found = [
        (t.name, int(t.shape[0]), int(t.shape[1]))
        for t in reader.tensors
        if t.name.endswith(".weight") and any(f".{x}." in t.name for x in targets)
    ]
    return arch, found


def write_random_loras(
    base_gguf: Path,
    outs: Sequence[tuple[Path, int]],
    *,
    rank: int = 8,
    alpha: float = 16.0,
    strength: float = 0.12,
    targets: tuple[str, ...] = TARGETS,
) -> list[Path]:
    """Write one LoRA GGUF per (path, seed) for `base_gguf` with Gaussian A/B matrices (base read once)."""
    import numpy as np
    from gguf import GGUFWriter

    arch, tensors = _targets(base_gguf, targets)
    written = []
    for out, seed in outs:
        rng = np.random.default_rng(seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        writer = GGUFWriter(str(tmp), arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for name, n_in, n_out in tensors:
            # ggml shape is [n_in, n_out]; numpy arrays are written reversed, so A is (r, n_in), B is (n_out, r).
            a = rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(rank, n_in)).astype(np.float32)
            b = rng.normal(0.0, strength, size=(n_out, rank)).astype(np.float32)
            writer.add_tensor(name + ".lora_a", a)
            writer.add_tensor(name + ".lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        # Renamed into place: a reader never sees a half-written adapter.
        tmp.replace(out)
        written.append(out)
    return written


def write_random_lora(
    base_gguf: Path, out: Path, *, seed: int, strength: float = 0.12, rank: int = 8
) -> Path:
    """Write one random LoRA GGUF for `base_gguf`; returns `out`."""
    return write_random_loras(base_gguf, [(out, seed)], strength=strength, rank=rank)[0]
