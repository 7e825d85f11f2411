"""Recipes on the tiny model: loss masking, a real SFT run end to end in-process, OOM retry, KTO and DPO."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobspec.events import Emitter
from trainer.child import run_job


def _run(job: Path, resume: bool = False) -> tuple[int, Emitter]:
    emitter = Emitter()
    return run_job(job, emitter, threading.Event(), resume=resume), emitter


def _lora_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_trained_tokens_are_the_reply_plus_one_end_of_turn_token(
    make_job: Callable[..., Path], tiny_model: Any
) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from jobspec.config import TrainConfig
    from jobspec.jobdata import fit_rows, load_job_data
    from trainer.sftstage import lora_config, sft_args

    job = make_job()
    cfg = TrainConfig.from_json(job / "config.json")
    tok = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    rows, _ = fit_rows(load_job_data(job).train, tok, cfg.max_length)
    from datasets import Dataset

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.float32), lora_config(cfg)
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args(cfg, job, micro=2, accum=1, device="cpu"),
        train_dataset=Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        ),
        processing_class=tok,
    )
    eos = tok.eos_token_id
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        trained = [
            t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100
        ]
        assert tok.decode(trained) == row["target"] + "<|im_end|>"
        assert trained.count(eos) == 1 and trained[-1] == eos
        # Everything before the reply (system prompt, other members' turns, the assistant header) is masked.
        first = example["labels"].index(trained[0])
        assert all(label == -100 for label in example["labels"][:first])


def test_fit_rows_drops_oldest_context_turns_not_the_reply(
    make_job: Callable[..., Path], tiny_model: Any
) -> None:
    from transformers import AutoTokenizer

    from jobspec.jobdata import fit_rows, load_job_data

    tok = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    rows = load_job_data(make_job()).train
    longest = max(rows, key=lambda r: len(r["prompt"]))
    full = len(tok(longest["prompt"] + longest["completion"])["input_ids"])
    fitted, dropped = fit_rows([longest], tok, full - 1)
    assert dropped == 0
    user_turn = fitted[0]["messages"][-1]["content"]
    # The merged context turn lost its oldest speaker line, kept the latest one.
    assert longest["messages"][-1]["content"].endswith(user_turn) and len(user_turn) < len(
        longest["messages"][-1]["content"]
    )
    assert fitted[0]["messages"][0] == longest["messages"][0]
    assert fitted[0]["prompt"] != longest["prompt"]
    assert fitted[0]["completion"] == longest["completion"] and fitted[0]["n_tokens"] <= full - 1
    assert fit_rows([longest], tok, 5) == ([], 1)


def test_sft_run_lowers_loss_exports_and_reports(make_job: Callable[..., Path]) -> None:
    job = make_job(max_steps=8, eval_fidelity=False, tensorboard=True)
    rc, ev = _run(job)
    assert rc == 0, ev.of("finished")
    assert list((job / "tensorboard").glob("events.out.tfevents.*"))
    kinds = [e["event"] for e in ev.events]
    assert kinds[0] == "phase" and "started" in kinds and kinds[-1] == "finished"
    # The adapter is saved and announced before evaluation (so a failure there cannot lose it), then again after.
    artifacts = [i for i, k in enumerate(kinds) if k == "artifact"]
    assert len(artifacts) == 2 and artifacts[0] < kinds.index("metrics") < artifacts[1] < kinds.index(
        "finished"
    )
    assert [ev.of("artifact")[i]["evaluated"] for i in (0, 1)] == [False, True]
    progress = ev.of("progress")
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert all(
        p["total"] == 8 and p["tokens_per_s"] > 0 and p["peak_mem_mb"] > 0 and p["eta_s"] >= 0
        for p in progress
    )
    assert progress[-1]["loss"] < progress[0]["loss"] - 0.5
    folder = Path(ev.of("artifact")[0]["path"])
    assert folder == job / "output" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter.gguf", "meta.json", "loss.png"):
        assert (folder / name).stat().st_size > 0
    assert [p.name for p in (job / "output").iterdir()] == ["adapter"]  # no staging folder left behind
    png = (folder / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (600, 350)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["member"] == "1001" and meta["base_model"]["name"] == "tiny"
    assert len(meta["base_model"]["sha256"]) == 64
    assert meta["lineage"] == ["1001", "2002", "3003"]
    assert meta["training_config"]["max_steps"] == 8
    sft = meta["training"]["sft"]
    assert sft["steps"] == 8 and 0.0 <= sft["padding_fraction"] < 0.5 and sft["trained_tokens"] > 0
    metrics = meta["metrics"]
    assert metrics["ppl_adapter"] < metrics["ppl_base"] and metrics["active"] is True
    assert len(metrics["samples"]) == 2 and metrics["generated_by"] == "llama.cpp"
    assert ev.of("metrics")[0]["ppl_adapter"] == metrics["ppl_adapter"]
    resources = metrics["resources"]
    assert 0 < resources["train_peak_rss_mb"] <= resources["peak_rss_mb"]
    assert resources["estimate_mb"]["peak"] >= resources["estimate_mb"]["training"] > 0
    # The PEFT files load back with peft, onto the same base.
    state = _lora_state(folder)
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in state.items())


def test_simulated_cuda_oom_halves_micro_batch_and_resumes_from_checkpoint(
    make_job: Callable[..., Path],
) -> None:
    job = make_job(
        max_steps=6,
        save_steps=2,
        micro_batch_size=4,
        grad_accum=1,
        simulate_oom_at_step=3,
        eval_samples=0,
        eval_fidelity=False,
    )
    rc, ev = _run(job)
    assert rc == 0, ev.of("finished")
    retry = ev.of("oom_retry")
    assert retry == [{**retry[0], "micro_batch_size": 2, "grad_accum": 2, "resume_from_step": 2}]
    # The OOM hit inside step 3 (before it was logged); training resumed from checkpoint 2 at half the micro-batch.
    seq = [(e["event"], e.get("step")) for e in ev.events if e["event"] in ("progress", "oom_retry")]
    assert seq == [("progress", 1), ("progress", 2), ("oom_retry", None)] + [
        ("progress", s) for s in range(3, 7)
    ]
    meta = json.loads((job / "output" / "adapter" / "meta.json").read_text())
    assert meta["training"]["sft"]["micro_batch_size"] == 2 and meta["training"]["sft"]["grad_accum"] == 2
    assert meta["training"]["sft"]["steps"] == 6


def test_bad_dataset_fails_with_one_line_and_writes_no_adapter(make_job: Callable[..., Path]) -> None:
    job = make_job()
    (job / "dataset" / "train.jsonl").write_text('{"prompt": "x"}\n', encoding="utf-8")
    rc, ev = _run(job)
    assert rc == 1
    finished = ev.of("finished")[0]
    assert (
        finished["status"] == "failed"
        and finished["error"] == "train.jsonl:1: missing string field(s) completion"
    )
    assert not (job / "output").exists()


@pytest.mark.parametrize("mode", ["sft+kto", "sft+dpo"])
def test_preference_stage_runs_from_the_sft_adapter_and_changes_it(
    make_job: Callable[..., Path], mode: str
) -> None:
    sft_job = make_job("sft", max_steps=4, eval_samples=0, eval_fidelity=False, preference=True)
    pref_job = make_job(
        "pref", mode=mode, max_steps=4, pref_steps=3, eval_samples=0, eval_fidelity=False, preference=True
    )
    assert _run(sft_job)[0] == 0
    rc, ev = _run(pref_job)
    assert rc == 0, ev.of("finished")
    stage = mode.split("+")[1]
    assert [e["stage"] for e in ev.of("started")] == ["sft", stage]
    assert [p["step"] for p in ev.of("progress") if p["stage"] == stage] == [1, 2, 3]
    folder = pref_job / "output" / "adapter"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["training"][stage]["steps"] == 3 and len(meta["losses"][stage]) == 3
    # Same seed and data: the SFT stage is identical, so any difference comes from the preference stage.
    a, b = _lora_state(sft_job / "output" / "adapter"), _lora_state(folder)
    assert a.keys() == b.keys() and not any(".ref." in k for k in b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_padding_free_batches_keep_examples_apart(tiny_model: Any) -> None:
    """Padding-free batching concatenates examples; the attention must still see each one alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir, dtype=torch.float32).eval()
    a, b = torch.randint(3, 500, (1, 17)), torch.randint(3, 500, (1, 9))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(17), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): a KV cache disables the packed-sequence detection.
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=a).logits[0], model(input_ids=b).logits[0]])
        leaky = model(input_ids=packed).logits[0]  # one long sequence: b attends to a
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(leaky[17:], alone[17:], atol=1e-2)
