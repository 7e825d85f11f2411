"""`doppel bench train`'s two sides (trainer/bench.py, run in the trainer child) measure the same work: same
examples, same real tokens, different padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.synthetic import synthetic_rows


def test_both_sides_train_the_same_tokens(tiny_model: Any, tiny_chat_format: Any, tmp_path: Path) -> None:
    from jobspec.config import TrainConfig
    from trainer.basemodel import load_tokenizer
    from trainer.bench import baseline_run, our_run

    tokenizer = load_tokenizer(tiny_model.hf_dir)
    rows = synthetic_rows(16, seed=5, chat_format=tiny_chat_format, long_tail=True)
    cfg = TrainConfig(
        base_model=str(tiny_model.hf_dir),
        max_steps=4,
        micro_batch_size=4,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        save_steps=100,
        max_length=512,
        logging_steps=4,
    ).validate()
    ours = our_run(cfg, tiny_model.hf_dir, rows, tmp_path / "ours")
    baseline = baseline_run(cfg, tiny_model.hf_dir, tokenizer, rows, tmp_path / "baseline")

    expected = sum(
        len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) for r in rows
    )
    # One epoch of 16 rows in 4 steps of 4: every token of every row, once, on each side (the end-of-turn tokens too).
    assert ours["trained_tokens"] == baseline["trained_tokens"] == pytest.approx(expected, abs=len(rows))
    assert ours["padding_fraction"] == 0.0
    assert baseline["padding_fraction"] > 0.1  # long-tailed contexts padded to the longest row of each batch
    assert ours["cpu_seconds"] > 0 and baseline["cpu_seconds"] > 0
