"""GGUF LoRA export: llama.cpp with adapter.gguf must compute what transformers+PEFT computes with the same adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HELDOUT_TEXT = (
    "<|im_start|>system\nYou are Ada, a member of this Discord community, chatting in #general.<|im_end|>\n"
    "<|im_start|>user\nBo: anyone around for a game tonight? I think we should meet at 7pm.<|im_end|>\n"
    "<|im_start|>assistant\nomg yes!!! the build is sooo good haha :) see you tomorrow, the server is down again"
    " so check the logs first. The quick brown fox jumps over the lazy dog.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def random_adapter(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """A PEFT LoRA on every projection with random A *and* B (B=0 would make parity vacuous), saved + exported."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobspec.config import DEFAULT_TARGETS
    from trainer.export_gguf import BaseInfo, export_lora_gguf

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.25)
    model.eval()
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    summary = export_lora_gguf(out, out / "adapter.gguf", BaseInfo.from_hf_config(base.config))
    assert summary["modules"] == 2 * len(DEFAULT_TARGETS)
    return model, tok, out


def _llama(tiny_model: Any, adapter: Path | None) -> Any:
    from llama_cpp import Llama

    kwargs = {"lora_path": str(adapter)} if adapter else {}
    return Llama(
        model_path=str(tiny_model.gguf_path),
        n_ctx=512,
        logits_all=True,
        n_threads=1,
        verbose=False,
        seed=0,
        **kwargs,
    )


def _llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def test_gguf_metadata_and_shapes_follow_llama_cpp_lora_format(random_adapter: tuple[Any, Any, Path]) -> None:
    from gguf import GGUFReader

    _, _, folder = random_adapter
    reader = GGUFReader(str(folder / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    assert reader.fields["general.architecture"].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.1.ffn_down.weight.lora_b"]
    # GGML ne: lora_a [in, r], lora_b [r, out]; k has 2 kv heads * 16 dims = 32 outputs, hidden is 64.
    assert list(a.shape) == [64, 4]
    assert list(b.shape) == [4, 64]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [4, 32]


def test_llama_cpp_matches_peft_with_the_exported_adapter(
    tiny_model: Any, random_adapter: tuple[Any, Any, Path]
) -> None:
    import torch

    model, tok, folder = random_adapter
    ids = tok(HELDOUT_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 60
    with torch.no_grad():
        hf_adapter = model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            hf_base = model(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(tiny_model, folder / "adapter.gguf")
    try:
        # The tiny GGUF's tokenizer metadata reproduces the HF tokenizer exactly (specials included).
        assert llm.tokenize(HELDOUT_TEXT.encode(), add_bos=False, special=True) == ids
        cpp_adapter = _llama_logits(llm, ids)
        agreement = float((cpp_adapter.argmax(-1) == hf_adapter.argmax(-1)).mean())
        # The adapter must matter, or agreement would prove nothing about the export.
        changed = float((hf_base.argmax(-1) != hf_adapter.argmax(-1)).mean())
        assert changed > 0.2, f"adapter changes only {changed:.0%} of next-token predictions"
        assert agreement >= 0.98, f"top-1 agreement {agreement:.3f}"
        assert np.abs(cpp_adapter - hf_adapter).max() < 0.05
        prompt = ids[:40]
        with torch.no_grad():
            hf_gen = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        cpp_gen = _llama_greedy(llm, prompt, 32)
        assert cpp_gen == hf_gen
        with torch.no_grad(), model.disable_adapter():
            hf_base_gen = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert hf_base_gen != hf_gen
    finally:
        llm.close()


def test_export_without_q_k_permutation_would_break_parity(
    tiny_model: Any, random_adapter: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards the parity test itself: an export that skips the llama q/k permutation must be caught by it."""
    import torch

    from trainer import export_gguf

    model, tok, folder = random_adapter
    monkeypatch.setattr(export_gguf, "permute_for_gguf", lambda name, data, info: data)
    info = export_gguf.BaseInfo.from_hf_config(model.config)
    export_gguf.export_lora_gguf(folder, tmp_path / "unpermuted.gguf", info)
    ids = tok(HELDOUT_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(tiny_model, tmp_path / "unpermuted.gguf")
    try:
        assert np.abs(_llama_logits(llm, ids) - hf).max() > 0.05
    finally:
        llm.close()


def test_export_rejects_a_folder_that_is_not_a_lora(tmp_path: Path) -> None:
    from jobspec.errors import ExportError
    from trainer.export_gguf import BaseInfo, export_lora_gguf

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}), encoding="utf-8")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match="only LoRA"):
        export_lora_gguf(tmp_path, tmp_path / "x.gguf", BaseInfo("llama", 2, 4, 2))
    assert not (tmp_path / "x.gguf").exists()
