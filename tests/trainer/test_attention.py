"""Per-example attention over packed rows: the same outputs and gradients as separate examples, cheaper than a mask."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from trainer.synthetic import synthetic_rows


def _packed(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[int]]]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = []
    for r in rows:
        ids = tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": ids})
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    return collate(examples), [e["input_ids"] for e in examples]


def _model(tiny_model: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        str(tiny_model.hf_dir), dtype=torch.float32, attn_implementation="sdpa"
    )


def test_packed_row_matches_each_example_alone(tiny_model: Any, tiny_chat_format: Any) -> None:
    import torch

    from trainer.attention import segments_for

    model = _model(tiny_model)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model.hf_dir))
    batch, examples = _packed(
        tokenizer, synthetic_rows(4, seed=11, chat_format=tiny_chat_format, long_tail=True)
    )
    assert len({len(e) for e in examples}) > 1
    # use_cache=False as in training: transformers only detects packed rows when no cache is passed.
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}

    with segments_for(model, True):
        assert model.config._attn_implementation == "doppel_segments"
        packed = model(**inputs).logits[0]
        packed.square().mean().backward()
    segment_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    masked = model(**inputs).logits[0]  # transformers' own block-diagonal mask over the row
    masked.square().mean().backward()
    assert model.config._attn_implementation == "sdpa"

    start = 0
    for ids in examples:
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(packed[start : start + len(ids)], alone, rtol=1e-4, atol=1e-4)
        start += len(ids)
    torch.testing.assert_close(packed, masked, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(segment_grads[name], p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_padded_batches_keep_sdpa_with_the_mask(tiny_model: Any, tiny_chat_format: Any) -> None:
    import torch

    from trainer.attention import segments_for

    model = _model(tiny_model)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model.hf_dir))
    texts = [r["prompt"] + r["completion"] for r in synthetic_rows(3, seed=2, chat_format=tiny_chat_format)]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert int(batch["attention_mask"].min()) == 0, "the batch needs padding for this test"
    with torch.no_grad():
        plain = model(**batch).logits
        with segments_for(model, True):
            through = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(through[real], plain[real])


def test_recipe_trains_with_segments_and_restores_the_model(
    tiny_model: Any, tiny_chat_format: Any, tmp_path: Path
) -> None:
    from jobspec.config import TrainConfig
    from jobspec.events import Emitter
    from trainer.basemodel import load_base
    from trainer.sftstage import train_sft

    cfg = TrainConfig(
        base_model=str(tiny_model.hf_dir),
        max_steps=4,
        micro_batch_size=4,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        learning_rate=5e-3,
        save_steps=100,
        logging_steps=1,
    ).validate()
    assert cfg.batching == "padding_free"
    base = load_base(tiny_model.hf_dir, quantize_4bit=False)
    rows = synthetic_rows(16, seed=3, chat_format=tiny_chat_format)
    _, stats = train_sft(
        cfg,
        tmp_path,
        base.model,
        base.tokenizer,
        rows,
        Emitter(),
        threading.Event(),
        resume=False,
        device="cpu",
    )
    losses = [loss for _, loss in stats["losses"]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert stats["padding_fraction"] == pytest.approx(0.0)
    assert base.model.config._attn_implementation == "sdpa"
