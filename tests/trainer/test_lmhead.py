"""The compact LM-head loss (labelled positions only) against TRL's own fused head on the same packed batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.synthetic import synthetic_rows


def _trainer(tiny_model: Any, chat_format: Any, tmp_path: Path, batching: str) -> Any:
    import torch
    from datasets import Dataset
    from peft import get_peft_model

    from jobspec.config import TrainConfig
    from trainer.basemodel import load_base
    from trainer.lmhead import PersonaSFTTrainer
    from trainer.sftstage import lora_config, sft_args

    torch.manual_seed(0)
    cfg = TrainConfig(
        base_model=str(tiny_model.hf_dir),
        max_steps=2,
        micro_batch_size=4,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        batching=batching,
        max_length=256,
    ).validate()
    base = load_base(tiny_model.hf_dir, quantize_4bit=False)
    model = get_peft_model(base.model, lora_config(cfg))
    # LoRA B starts at zero; random B makes the adapter's gradient path non-trivial to compare.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rows = synthetic_rows(8, seed=3, chat_format=chat_format, long_tail=True)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return PersonaSFTTrainer(
        model=model,
        args=sft_args(cfg, tmp_path, micro=4, accum=1, device="cpu"),
        train_dataset=dataset,
        processing_class=base.tokenizer,
    )


def _loss_and_grads(compute: Any, trainer: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    model = trainer.model
    model.zero_grad()
    loss = compute(trainer, model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize(
    ("batching", "chunked"), [("padding_free", False), ("length_grouped", False), ("padding_free", True)]
)
def test_compact_loss_equals_trls_fused_head(
    tiny_model: Any,
    tiny_chat_format: Any,
    tmp_path: Path,
    batching: str,
    chunked: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trl import SFTTrainer

    from jobspec import memory
    from trainer.lmhead import PersonaSFTTrainer, compact_loss_applies

    if (
        chunked
    ):  # the head in chunks of 16 positions (the least it takes), each recomputed in the backward pass
        monkeypatch.setattr(memory, "HEAD_CHUNK_BYTES", 1)
    trainer = _trainer(tiny_model, tiny_chat_format, tmp_path, batching)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"].numel() // 2, "persona rows are mostly context"
    if chunked:
        assert labelled > 3 * 16, "the labelled positions span several chunks"
    assert compact_loss_applies(trainer.model, batch["input_ids"].device)

    ours, our_grads = _loss_and_grads(PersonaSFTTrainer.compute_loss, trainer, batch)
    trl, trl_grads = _loss_and_grads(SFTTrainer.compute_loss, trainer, batch)
    assert ours == pytest.approx(trl, rel=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    for name, grad in our_grads.items():
        assert grad.abs().sum() > 0, name
        assert (grad - trl_grads[name]).abs().max() <= 1e-5 * (1 + trl_grads[name].abs().max()), name
    # The metrics TRL logs are logged on the compact path too, with the same values.
    metrics = trainer._metrics["train"]
    assert metrics["mean_token_accuracy"][0] == pytest.approx(metrics["mean_token_accuracy"][1], abs=1e-6)
    assert metrics["entropy"][0] == pytest.approx(metrics["entropy"][1], rel=1e-4)


def test_batch_without_labels_is_a_differentiable_zero(
    tiny_model: Any, tiny_chat_format: Any, tmp_path: Path
) -> None:
    trainer = _trainer(tiny_model, tiny_chat_format, tmp_path, "padding_free")
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch["labels"][:] = -100
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0
