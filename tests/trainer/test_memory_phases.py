"""Peak RSS of each phase of a real trainer child (`python -m trainer run`) stays within its bound.

Memory is measured by the child itself (VmHWM per phase, reset between phases: `trainer.meter.PhaseMeter`), in
a subprocess of its own, never timed. Bounds are growth over the `loading` phase (the runtime and the weights),
so they hold on any machine: what a phase adds must stay what it needs, not what the batch's logits would take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
# A vocabulary wide enough that whole-batch logits show: 4 x 512 positions x 65,536 x 4 bytes = 0.5 GB a copy,
# where a chunk of the head (`jobspec.memory.head_chunk`) is 128 MiB.
WIDE_VOCAB = 65_536
# MiB a phase may add over `loading` (which holds torch, transformers and the weights): TRL, PEFT, datasets and
# the trainer's own state for training; the chunked head for perplexity; llama.cpp and the embedder after.
GROWTH_MB = {
    "dataset": 250,
    "training": 450,
    "export": 450,
    "perplexity": 450,
    "generation": 500,
    "fidelity": 700,
}


def _run_child(job: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = next(e for e in events if e["event"] == "metrics")
    return dict(metrics)


def _wide_model(dest: Path) -> Path:
    from trainer.tinymodel import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(WIDE_VOCAB, hidden=64, layers=2)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _long_rows(job: Path) -> None:
    # Held-out rows near max_length: a perplexity batch then spans 4 x ~500 positions.
    for split in ("heldout",):
        path = job / "dataset" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for r in rows:
            r["prompt"] = (r["prompt"] + " ") * 6
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _check(metrics: dict[str, Any], phases: tuple[str, ...]) -> dict[str, float]:
    res = metrics["resources"]
    peaks = res["phases_mb"]
    assert set(phases) <= set(peaks), peaks
    loading = peaks["loading"]
    over = {p: round(peaks[p] - loading, 1) for p in phases if p != "loading"}
    too_big = {p: f"{g} MiB > {GROWTH_MB[p]}" for p, g in over.items() if g > GROWTH_MB[p]}
    assert not too_big, f"phases grew past their bounds over loading ({loading} MiB): {too_big}; {peaks}"
    # Pre-flight's estimate is never under what the job took.
    assert res["estimate_mb"]["peak"] >= res["peak_rss_mb"], res
    return over


def test_each_phase_of_a_full_job_stays_within_its_bound(make_job: Callable[..., Path]) -> None:
    job = make_job(eval_samples=2, eval_fidelity=True, max_steps=4)
    metrics = _run_child(job)
    _check(metrics, ("loading", "dataset", "training", "export", "perplexity", "generation", "fidelity"))
    # Nothing of what evaluation reports is lost to the memory work.
    assert metrics["ppl_adapter"] > 0 and metrics["ppl_base"] > 0
    assert len(metrics["samples"]) == 2 and "style" in metrics["fidelity"]


def test_a_wide_vocabulary_does_not_materialise_whole_batch_logits(
    make_job: Callable[..., Path], tmp_path: Path
) -> None:
    wide = _wide_model(tmp_path / "wide")
    job = make_job(
        base_model=str(wide),
        base_gguf="",
        max_length=512,
        micro_batch_size=8,
        max_steps=3,
        eval_batch_size=4,
        eval_samples=0,
        eval_fidelity=False,
    )
    _long_rows(job)
    metrics = _run_child(job)
    over = _check(metrics, ("loading", "dataset", "training", "perplexity"))
    # Whole-batch float32 logits of one perplexity batch alone would be 4 x ~500 x 65,536 x 4 bytes = 0.5 GB.
    assert over["perplexity"] < 4 * 400 * WIDE_VOCAB * 4 / MIB
    assert metrics["ppl_adapter"] > 0
