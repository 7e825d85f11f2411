"""Just enough of a GGUF header, read in milliseconds: metadata, and a model's architecture, shape and size."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.errors import GGUFFileError

GGUF_MAGIC = b"GGUF"

# Both `add-base` (models.bases, which must not load the trainer) and the LoRA exporter (trainer.export_gguf)
# decide by the next two tables, so they are declared once, here.
# transformers `model_type` -> llama.cpp architecture, as convert_hf_to_gguf.py registers the HF classes
# (Mistral is converted as llama; the text-only Gemma 3 config is `gemma3_text`).
HF_TO_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "phi3": "phi3",
}
# Architectures whose whole path (training, export, llama.cpp applying the LoRA) is tested end to end
# (tests/trainer/test_export_archs.py); anything else is refused when a base model is added.
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# GGUF value types -> struct format of the scalar ones (8 = string, 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class ModelShape:
    """What pre-flight and the registry need to know about a base model."""

    architecture: str
    params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    context: int
    file_bytes: int
    model_type: str = "model"


def read_shape(path: Path) -> ModelShape:
    """Parse the header and tensor table of a GGUF file (no tensor data is read)."""
    try:
        with path.open("rb") as fh:
            return _parse(fh, path.stat().st_size)
    except FileNotFoundError:
        raise GGUFFileError(f"{path}: no such file") from None
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
        raise GGUFFileError(f"{path}: not a readable GGUF file ({exc})") from None


def read_metadata(path: Path, *, arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The key/value metadata of a GGUF file; an array is its length unless its key is in `arrays` (read whole)."""
    try:
        with path.open("rb") as fh:
            _, kv = _header(fh, arrays)
            return kv
    except FileNotFoundError:
        raise GGUFFileError(f"{path}: no such file") from None
    except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
        raise GGUFFileError(f"{path}: not a readable GGUF file ({exc})") from None


def _header(fh: IO[bytes], arrays: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Tensor count and metadata; leaves `fh` at the tensor table."""
    if fh.read(4) != GGUF_MAGIC:
        raise ValueError("bad magic")
    (version,) = struct.unpack("<I", fh.read(4))
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    n_tensors, n_kv = struct.unpack("<QQ", fh.read(16))
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _string(fh)
        (kind,) = struct.unpack("<I", fh.read(4))
        kv[key] = _value(fh, kind, keep=key in arrays)
    return n_tensors, kv


def _parse(fh: IO[bytes], size: int) -> ModelShape:
    n_tensors, kv = _header(fh)
    params = 0
    for _ in range(n_tensors):
        _string(fh)
        (n_dims,) = struct.unpack("<I", fh.read(4))
        count = 1
        for dim in struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims)):
            count *= dim
        fh.read(12)  # ggml type (u32) + data offset (u64)
        params += count
    arch = str(kv.get("general.architecture", "unknown"))
    vocab = kv.get(f"{arch}.vocab_size") or kv.get("tokenizer.ggml.tokens") or 0
    return ModelShape(
        architecture=arch,
        params=params,
        layers=int(kv.get(f"{arch}.block_count", 0)),
        hidden=int(kv.get(f"{arch}.embedding_length", 0)),
        heads=int(kv.get(f"{arch}.attention.head_count", 0)),
        vocab=int(vocab),
        context=int(kv.get(f"{arch}.context_length", 0)),
        file_bytes=size,
        model_type=str(kv.get("general.type", "model")),
    )


def _string(fh: IO[bytes]) -> str:
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > 1 << 24:
        raise ValueError("implausible string length")
    return fh.read(length).decode("utf-8")


def _value(fh: IO[bytes], kind: int, keep: bool = False) -> Any:
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if kind == 8:
        return _string(fh)
    if kind == 9:
        (item_kind,) = struct.unpack("<I", fh.read(4))
        (count,) = struct.unpack("<Q", fh.read(8))
        if keep:
            return [_value(fh, item_kind, keep=True) for _ in range(count)]
        if item_kind in _SCALARS:
            fh.seek(struct.calcsize("<" + _SCALARS[item_kind]) * count, 1)
        elif item_kind == 8:
            for _ in range(count):
                (length,) = struct.unpack("<Q", fh.read(8))
                fh.seek(length, 1)
        else:
            for _ in range(count):
                _value(fh, item_kind)
        return count  # skipped arrays are only needed for their length (the tokenizer's vocabulary)
    raise ValueError(f"unknown GGUF value type {kind}")
