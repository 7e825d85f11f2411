"""Loading the base model to train on: a GGUF file (dequantized by transformers) or a HF folder; QLoRA on CUDA."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobspec.errors import JobConfigError


@dataclass
class LoadedBase:
    """A base model ready for PEFT, its tokenizer, and how it was loaded."""

    model: Any
    tokenizer: Any
    device: str
    quantized: bool
    dtype: str


def _split(path: Path) -> tuple[Path, str | None]:
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return path, None
    raise JobConfigError(f"base model not found or not a GGUF file / HF folder: {path}")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a GGUF file or HF folder, with a pad token set (the end-of-turn token if none)."""
    from transformers import AutoTokenizer

    folder, gguf_file = _split(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _strip_gguf_quantizer(model: Any) -> None:
    # transformers dequantizes GGUF weights to float but still tags the model as GGUF-quantized, and its Trainer
    # refuses to train such a model; the tensors are plain floats, so the tag is dropped.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def dequantized_folder(gguf_path: Path, cache_root: Path) -> Path:
    """A HF folder with the GGUF's weights dequantized to float32, converted once and cached by file hash.

    Reading a GGUF through transformers costs about a minute for SmolLM2 on 2 cores (mostly metadata parsing);
    the cached folder loads in about a second, and QLoRA on CUDA needs float weights to quantize anyway.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache_root / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (dest / "config.json").exists():
        return dest
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=cache_root))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        _strip_gguf_quantizer(model)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if dest.exists():  # another job converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_base(
    path: Path,
    *,
    quantize_4bit: bool = True,
    gradient_checkpointing: bool = True,
    cache_root: Path | None = None,
) -> LoadedBase:
    """Load for training: CUDA -> 4-bit NF4 + bf16 (QLoRA) when asked, else float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if cache_root is not None and path.is_file() and path.suffix == ".gguf":
        path = dequantized_folder(path, cache_root)
    folder, gguf_file = _split(path)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = load_tokenizer(path)
    quantized = False
    if torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
        if quantize_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
            quantized = True
        kwargs["device_map"] = {"": 0}
    else:
        # bf16 on CPU is slow and lossy for small models; float32 keeps training and parity exact.
        device, dtype = "cpu", torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise JobConfigError(f"cannot load base model {path}: {str(exc).splitlines()[0]}") from None
    if gguf_file:
        _strip_gguf_quantizer(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif device == "cuda" and gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        device=device,
        quantized=quantized,
        dtype=str(dtype).removeprefix("torch."),
    )


def file_sha256(path: Path) -> str:
    """sha256 of a GGUF file, or of a HF folder's weight files in name order."""
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    )
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
