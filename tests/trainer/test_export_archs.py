"""Per-architecture GGUF LoRA export: the same file as llama.cpp's converter, and llama.cpp applying it as PEFT does.

One tiny random model per architecture (llama, qwen2, qwen3, gemma2, gemma3, phi3), written as a GGUF by
trainer.tinymodel, with a random LoRA on every projection (A and B random: B=0 would make parity vacuous).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import llama_cpp_reference as reference
from trainer.tinymodel import ARCHS

TEXT = (
    "<|im_start|>user\nBo: anyone around for a game tonight? I think we should meet at 7pm.<|im_end|>\n"
    "<|im_start|>assistant\nomg yes!!! the build is sooo good haha :) see you tomorrow, the server is down again"
    " so check the logs first. The quick brown fox jumps over the lazy dog.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def converter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Kept in pytest's cache between runs; a run with the cache plugin off (`-p no:cacheprovider`) builds it anew.
    cache = getattr(request.config, "cache", None)
    root = (
        Path(cache.mkdir("llama-cpp-converter"))
        if cache is not None
        else tmp_path_factory.mktemp("converter")
    )
    return reference.converter_tree(root)


@pytest.fixture(scope="module", params=ARCHS)
def arch_adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model of one architecture, a random PEFT LoRA on it, and that LoRA exported by trainer.export_gguf."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobspec.config import DEFAULT_TARGETS
    from trainer.export_gguf import BaseInfo, export_lora_gguf, lora_targets
    from trainer.tinymodel import build_tiny

    arch = request.param
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(arch)
    tiny = build_tiny(root / "base", arch=arch, seed=3)
    tok = AutoTokenizer.from_pretrained(tiny.hf_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32, attn_implementation="eager")
    targets = lora_targets(base.config.model_type, DEFAULT_TARGETS)
    torch.manual_seed(1)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.25)
    model.eval()
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    summary = export_lora_gguf(adapter, adapter / "adapter.gguf", BaseInfo.from_hf_config(base.config))
    assert summary["modules"] == len(targets) * base.config.num_hidden_layers
    return {"arch": arch, "tiny": tiny, "model": model, "tok": tok, "adapter": adapter, "targets": targets}


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def test_export_matches_llama_cpp_converter(
    arch_adapter: dict[str, Any], converter: Path, tmp_path: Path
) -> None:
    ref_path = reference.convert_lora(
        converter, arch_adapter["tiny"].hf_dir, arch_adapter["adapter"], tmp_path / "ref.gguf"
    )
    ref_kv, ref_t = _read(ref_path)
    our_kv, our_t = _read(arch_adapter["adapter"] / "adapter.gguf")
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert our_kv[key] == ref_kv[key], key
    assert our_kv["general.architecture"] == arch_adapter["arch"]
    assert sorted(our_t) == sorted(ref_t)
    for name, ref in ref_t.items():
        assert our_t[name].shape == ref.shape, name
        np.testing.assert_allclose(our_t[name], ref, rtol=0, atol=1e-6, err_msg=name)
    if arch_adapter["arch"] == "phi3":  # the fused projections keep their LoRA, as llama.cpp keeps them fused
        assert {"blk.0.attn_qkv.weight.lora_b", "blk.0.ffn_up.weight.lora_b"} <= set(our_t)
        assert not any("attn_q.weight" in n or "ffn_gate" in n for n in our_t)


def _logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _hf_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], int]:
    """transformers + PEFT greedy tokens, and how many come before the first near tie of the two best logits."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    gaps = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    return out.sequences[0, len(prompt) :].tolist(), next(
        (i for i, g in enumerate(gaps) if g < 0.01), len(gaps)
    )


def test_llama_cpp_applies_the_adapter_as_peft_does(arch_adapter: dict[str, Any]) -> None:
    import torch
    from llama_cpp import Llama

    model, tok = arch_adapter["model"], arch_adapter["tok"]
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            hf_base = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(
        model_path=str(arch_adapter["tiny"].gguf_path),
        lora_path=str(arch_adapter["adapter"] / "adapter.gguf"),
        n_ctx=512,
        logits_all=True,
        n_threads=1,
        verbose=False,
        seed=0,
    )
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
        cpp = _logits(llm, ids)
        changed = float((hf_base.argmax(-1) != hf.argmax(-1)).mean())
        assert changed > 0.2, f"the adapter changes only {changed:.0%} of next-token predictions"
        assert float((cpp.argmax(-1) == hf.argmax(-1)).mean()) >= 0.98
        assert np.abs(cpp - hf).max() < 0.1  # float32 noise; a wrong export is off by whole units
        # A step whose two best logits are closer than the engines' float noise (~0.01) is a coin toss: the
        # continuation is compared up to the first such tie, from the first cut of the text that gives 8 tokens.
        for cut in (30, 40, 50, 20, 60, 70):
            prompt = ids[:cut]
            want, n = _hf_greedy(model, prompt, 16)
            if n >= 8:
                break
        assert n >= 8, "greedy decoding meets a near tie within 8 tokens from every cut of the text"
        assert _greedy(llm, prompt, n) == want[:n]
    finally:
        llm.close()


def test_llama_permutation_on_another_architecture_would_break_parity(
    arch_adapter: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the parity test: q/k rows permuted as for llama, where the converter does not, must be caught."""
    import torch
    from llama_cpp import Llama

    from trainer import export_gguf

    arch = arch_adapter["arch"]
    if arch in ("llama", "phi3"):  # llama is guarded in test_export.py; phi3's q/k live inside the fused qkv
        pytest.skip(f"{arch}: not applicable")
    monkeypatch.setattr(export_gguf, "PERMUTED_ARCHS", {arch})
    model = arch_adapter["model"]
    export_gguf.export_lora_gguf(
        arch_adapter["adapter"], tmp_path / "wrong.gguf", export_gguf.BaseInfo.from_hf_config(model.config)
    )
    ids = arch_adapter["tok"](TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(
        model_path=str(arch_adapter["tiny"].gguf_path),
        lora_path=str(tmp_path / "wrong.gguf"),
        n_ctx=512,
        logits_all=True,
        n_threads=1,
        verbose=False,
    )
    try:
        assert np.abs(_logits(llm, ids) - hf).max() > 0.1
    finally:
        llm.close()
