"""PEFT LoRA -> llama.cpp GGUF LoRA, written with the `gguf` library the way llama.cpp's convert_lora_to_gguf.py does."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.ggufinfo import HF_TO_GGUF_ARCH
from jobspec.errors import ExportError

# Architectures whose converter permutes q/k rows (HF rotary layout -> GGML's interleaved one). Only the llama
# family: qwen2/qwen3/gemma2/gemma3/phi3 use NEOX-style rotary in llama.cpp, which is the HF layout already.
PERMUTED_ARCHS = {"llama"}
# LoRA target modules per architecture. Phi-3 fuses q/k/v and gate/up into one Linear each, and llama.cpp keeps
# them fused (attn_qkv, ffn_up), so the adapter goes on the fused modules, as the converter maps them.
FUSED_TARGETS = {
    "phi3": {
        "q_proj": "qkv_proj",
        "k_proj": "qkv_proj",
        "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
    }
}


def gguf_arch(model_type: str) -> str:
    """llama.cpp's architecture name for a transformers `model_type` (unknown types pass through unchanged)."""
    return HF_TO_GGUF_ARCH.get(model_type, model_type)


def lora_targets(arch: str, wanted: list[str] | tuple[str, ...]) -> list[str]:
    """The module names a LoRA on `wanted` projections has in this architecture (fused ones deduplicated)."""
    fused = FUSED_TARGETS.get(gguf_arch(arch), {})
    out: list[str] = []
    for name in wanted:
        mapped = fused.get(name, name)
        if mapped not in out:
            out.append(mapped)
    return out


@dataclass(frozen=True)
class BaseInfo:
    """What the exporter needs to know about the base model the adapter was trained on."""

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int

    @classmethod
    def from_hf_config(cls, config: Any) -> BaseInfo:
        """From a transformers model config (LlamaConfig and friends)."""
        arch = gguf_arch(str(getattr(config, "model_type", "llama")))
        n_head = int(config.num_attention_heads)
        return cls(
            arch=arch,
            n_layers=int(config.num_hidden_layers),
            n_head=n_head,
            n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        )

    @classmethod
    def from_gguf(cls, path: Path) -> BaseInfo:
        """From a base model GGUF's metadata."""
        from core.ggufinfo import read_metadata

        get = read_metadata(path).get

        arch = str(get("general.architecture"))
        n_head = get(f"{arch}.attention.head_count")
        n_layers = get(f"{arch}.block_count")
        if n_head is None or n_layers is None:
            raise ExportError(f"{path}: not a model GGUF with {arch} attention metadata")
        n_kv = get(f"{arch}.attention.head_count_kv") or n_head
        return cls(arch=arch, n_layers=int(n_layers), n_head=int(n_head), n_head_kv=int(n_kv))


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Row permutation of q/k projections, exactly as llama.cpp's `LlamaModel.permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def permute_for_gguf(hf_name: str, data: np.ndarray, info: BaseInfo) -> np.ndarray:
    """Apply the q/k permutation a base tensor (or a LoRA B matrix) of `hf_name` needs in GGUF."""
    if info.arch not in PERMUTED_ARCHS:
        return data
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_permute(data, info.n_head, info.n_head)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_permute(data, info.n_head, info.n_head_kv)
    return data


def gguf_tensor_name(hf_name: str, info: BaseInfo) -> str:
    """GGUF name of a HF parameter (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    import gguf

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == info.arch), None)
    if arch is None:
        raise ExportError(f"architecture {info.arch!r} is unknown to the gguf library")
    name = gguf.get_tensor_name_map(arch, info.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"cannot map tensor {hf_name!r} to a GGUF name")
    return name


def _load_peft(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cfg_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise ExportError(
            f"{adapter_dir}: not a PEFT adapter folder (adapter_config.json / adapter_model.safetensors)"
        )
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter_dir}: only LoRA adapters export to GGUF, got {cfg.get('peft_type')}")
    from safetensors.torch import load_file

    tensors = {k: v.float().numpy() for k, v in load_file(str(weights_path)).items()}
    return cfg, tensors


def export_lora_gguf(
    adapter_dir: Path, out_path: Path, info: BaseInfo, *, dtype: str = "f32"
) -> dict[str, Any]:
    """Write `adapter_dir`'s PEFT LoRA as a llama.cpp LoRA GGUF at `out_path`; returns a summary."""
    import gguf

    cfg, tensors = _load_peft(adapter_dir)
    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        # PEFT scales rsLoRA by alpha/sqrt(r); llama.cpp always uses alpha/r, so fold the difference into alpha.
        alpha = alpha * math.sqrt(r)
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ExportError("per-module rank/alpha patterns cannot be expressed in a GGUF LoRA")
    if any(".lora_embedding_" in k or "lora_magnitude" in k for k in tensors):
        raise ExportError("embedding LoRA and DoRA adapters are not supported by the GGUF export")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = value
    if not pairs:
        raise ExportError(f"{adapter_dir}: adapter has no LoRA tensors")
    np_dtype = np.float16 if dtype == "f16" else np.float32
    writer = gguf.GGUFWriter(str(out_path), info.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    written = 0
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"LoRA module {module} lacks its A or B matrix")
        hf_name = module + ".weight"
        base_name = gguf_tensor_name(hf_name, info)
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[0] != r or b.shape[1] != r:
            raise ExportError(f"LoRA module {module}: unexpected shapes A{a.shape} B{b.shape} for r={r}")
        # W = B @ A, so permuting W's rows is permuting B's rows; A is left as is (convert_lora_to_gguf does the same).
        b = permute_for_gguf(hf_name, b, info)
        # numpy (r, in) / (out, r) become GGML ne [in, r] / [r, out]: the shapes llama.cpp validates on load.
        writer.add_tensor(base_name + ".lora_a", np.ascontiguousarray(a, dtype=np_dtype))
        writer.add_tensor(base_name + ".lora_b", np.ascontiguousarray(b, dtype=np_dtype))
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"modules": written, "r": r, "alpha": alpha, "dtype": dtype, "bytes": out_path.stat().st_size}
