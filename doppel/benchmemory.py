"""`doppel bench memory`: peak RSS of a training job's trainer child, phase by phase, beside its floor and pre-flight.

Cases: the bundled SmolLM2-135M under the `good` preset (training and the full evaluation: perplexity, llama.cpp
samples, style and attribution), and random-weight models with the exact shapes of Qwen2.5-0.5B and Qwen2.5-1.5B
(memory and speed do not depend on weight values; built from a config, nothing downloaded), each trained a few
real steps on real chat (`doppel/benchdata`, the fidelity bench's Ubuntu IRC logs) through `python -m trainer run`,
the product's own child. Each job also runs as a plain HF `Trainer` + PEFT on the same model and rows (its
tokens/s beside ours), in a trainer child of its own (`python -m trainer bench-memory`; the shaped models are
built by `bench-shape`: trainer/bench.py). On a GPU host the same child reports peak VRAM per phase
(`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings
from doppel.benchchild import trainer_events, trainer_result

# Exact shapes of the Qwen2.5 bases people use on CPUs and small GPUs (their config.json).
QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
# name -> (model, TrainConfig overrides). SmolLM2 runs the `good` preset as it is (micro-batch 8) with the full
# evaluation; the Qwen shapes train at micro-batch 2 (what pre-flight fits on a 16 GB host) and score perplexity.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("smollm2", {"max_steps": 4}),
    "qwen2.5-0.5b": (
        "qwen2.5-0.5b",
        {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "eval_max_examples": 8},
    ),
    "qwen2.5-1.5b": (
        "qwen2.5-1.5b",
        {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "eval_max_examples": 4},
    ),
}
TARGETS = {"smollm2-135m": 2000.0, "qwen2.5-1.5b": 12000.0}  # MiB of peak RSS (issue 31)


def say(text: str) -> None:
    """Progress on stderr: stdout carries the JSON."""
    print(f"[memory] {text}", file=sys.stderr, flush=True)


def memory(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `doppel bench memory`."""
    names = [c for c in str(getattr(args, "cases", "") or "").split(",") if c] or list(CASES)
    if getattr(args, "quick", False) and not getattr(args, "cases", ""):
        names = ["smollm2-135m"]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise UserFacingError(f"--cases: unknown case(s) {', '.join(unknown)} (known: {', '.join(CASES)})")
    home = Path(tempfile.mkdtemp(prefix="doppel-bench-memory-"))
    try:
        return asyncio.run(_run(dataclasses.replace(settings, home=home), names, settings))
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def _run(bench: Settings, names: list[str], settings: Settings) -> dict[str, Any]:
    from jobspec.config import TrainConfig

    bench.home.mkdir(parents=True, exist_ok=True)
    member, prep = await _real_chat(bench)
    say(f"real chat: {prep}")
    gguf = settings.base_gguf_path()
    result: dict[str, Any] = {"host": _host(), "data": prep, "cases": {}}
    for name in names:
        model, overrides = CASES[name]
        job = bench.home / "jobs" / name
        from core.chatformat import ChatFormat
        from data.store import Store
        from jobs.dataset import materialize

        async with Store.open(bench) as store:
            await materialize(
                store, bench, member, job, ChatFormat.from_gguf(gguf), encrypt=False, style="plain"
            )
        if model == "smollm2":
            base = {"base_model": str(gguf)}
        else:
            folder = _shaped_model(bench.home / "models" / model, model, gguf)
            base = {"base_model": str(folder), "base_gguf": "", "base_cache_dir": ""}
        cfg = TrainConfig.from_settings(
            bench, preset="good", member_id=member, persona_name=member, **base, **overrides
        )
        cfg = dataclasses.replace(cfg, priority="normal", adapt_threads=False, yield_to_serving=False)
        cfg.to_json(job / "config.json")
        say(f"{name}: training {cfg.max_steps} steps of {cfg.micro_batch_size}x{cfg.grad_accum}")
        ours = _child(job)
        say(f"{name}: {json.dumps(ours)}")
        baseline = _baseline(job)
        say(f"{name}: baseline {json.dumps(baseline)}")
        shape = _shape(model, gguf)
        result["cases"][name] = _case(name, cfg, ours, baseline, shape)
    result["meets_targets"] = all(c.get("meets_target", True) for c in result["cases"].values())
    result["estimate_within_1_3x"] = all(
        1.0 <= (c.get("estimate_over_peak") or 0) <= 1.3 for c in result["cases"].values()
    )
    return result


async def _real_chat(bench: Settings) -> tuple[str, dict[str, Any]]:
    """Import the fidelity bench's real chat (40 logs of the most active member) into the bench's own store."""
    from doppel.benchcorpus import author_id, choose_panel, load_logs, select_logs
    from doppel.benchstore import prepare

    logs_all = load_logs()
    panel = choose_panel(logs_all, 5)
    logs = select_logs(logs_all, panel, 40)
    prep = await prepare(bench, panel, logs)
    return author_id(panel[0]), {"logs": len(logs), "messages": prep["stored"], "authors": prep["authors"]}


def _shaped_model(dest: Path, name: str, gguf: Path) -> Path:
    """A random-weight Qwen2 of `name`'s shape, built in a trainer child (its 6 GB leave with it)."""
    if not (dest / "config.json").exists():
        config = {**QWEN_SHAPES[name], "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}
        trainer_result(
            "bench-shape",
            str(dest),
            "--config",
            json.dumps(config),
            "--tokenizer",
            str(gguf),
            what=f"bench memory: building {name}",
        )
    return dest


def _child(job: Path) -> dict[str, Any]:
    """Run the trainer child on `job`; its per-phase peaks, training throughput and pre-flight estimate."""
    t0 = time.monotonic()
    events = trainer_events("run", str(job), what=f"bench memory: training {job.name}")
    finished = events[-1]
    metrics = next(e for e in reversed(events) if e["event"] == "metrics")
    meta = json.loads((Path(finished["adapter"]) / "meta.json").read_text(encoding="utf-8"))
    sft = meta["training"]["sft"]
    res = metrics["resources"]
    return {
        "wall_s": round(time.monotonic() - t0, 1),
        "phases_mb": res.get("phases_mb"),
        "peak_rss_mb": res.get("peak_rss_mb"),
        "estimate_mb": res.get("estimate_mb"),
        "floor_mb": res.get("floor_mb"),
        "tokens_per_s": sft.get("tokens_per_s"),
        "real_tokens": sft.get("real_tokens"),
        "train_seconds": sft.get("train_seconds"),
        "cpu_seconds": sft.get("cpu_seconds"),
        "evaluation": {
            k: metrics.get(k) is not None for k in ("ppl_adapter", "ppl_base", "samples", "fidelity")
        },
        "attribution": bool(((metrics.get("fidelity") or {}).get("attribution") or {}).get("available")),
    }


def _baseline(job: Path) -> dict[str, Any]:
    """Plain HF `Trainer` + PEFT on the same model and rows, in a trainer child of its own (its own peak RSS)."""
    return trainer_result("bench-memory", str(job), what=f"bench memory: baseline of {job.name}")


def _shape(model: str, gguf: Path) -> Any:
    """The base's shape as pre-flight sees it: the GGUF header, or the Qwen config's arithmetic (same count)."""
    from core.ggufinfo import ModelShape, read_shape

    if model == "smollm2":
        return read_shape(gguf)
    c = QWEN_SHAPES[model]
    h, inter, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * inter + 2 * h  # q/k/v (biased), o, MLP, norms
    return ModelShape(
        architecture="qwen2",
        params=vocab * h + layers * per_layer + h,
        layers=layers,
        hidden=h,
        heads=c["num_attention_heads"],
        vocab=vocab,
        context=32768,
        file_bytes=0,
    )


def estimate(case: dict[str, Any]) -> dict[str, Any]:
    """Pre-flight's estimate (`jobspec.memory.memory_breakdown`) of a measured case, and its ratio to the peak."""
    from core.ggufinfo import ModelShape
    from jobspec.config import TrainConfig
    from jobspec.memory import memory_breakdown

    cfg = TrainConfig.from_dict(dict(case["config"]))
    phases = memory_breakdown(ModelShape(**case["shape"]), cfg, "cpu")
    mb = {k: round(v / 2**20, 1) for k, v in phases.items()}
    peak = float(case["peak_rss_mb"] or 0)
    return {"preflight_estimate_mb": mb, "estimate_over_peak": round(mb["peak"] / peak, 3) if peak else None}


def _case(name: str, cfg: Any, ours: dict[str, Any], baseline: dict[str, Any], shape: Any) -> dict[str, Any]:
    peak = float(ours["peak_rss_mb"] or 0)
    out: dict[str, Any] = {
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "steps": cfg.max_steps,
        **ours,
        "baseline": baseline,
        "tokens_per_s_ratio": (
            round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2)
            if ours.get("tokens_per_s") and baseline.get("tokens_per_s")
            else None
        ),
        # Per CPU-second as well: on a shared machine wall time mostly measures the neighbours.
        "tokens_per_cpu_s_ratio": (
            round(
                (ours["real_tokens"] / ours["cpu_seconds"])
                / (baseline["trained_tokens"] / baseline["cpu_seconds"]),
                2,
            )
            if ours.get("cpu_seconds") and baseline.get("cpu_seconds")
            else None
        ),
        "shape": dataclasses.asdict(shape),
        "config": cfg.to_dict(),
    }
    out.update(estimate(out))
    if name in TARGETS:
        out["target_peak_rss_mb"] = TARGETS[name]
        out["meets_target"] = peak <= TARGETS[name]
    return out


def rescore(result: dict[str, Any]) -> dict[str, Any]:
    """A saved result with pre-flight's estimates computed again (the estimate is arithmetic; the peaks stay)."""
    for case in result["cases"].values():
        case.update(estimate(case))
    result["estimate_within_1_3x"] = all(
        1.0 <= (c.get("estimate_over_peak") or 0) <= 1.3 for c in result["cases"].values()
    )
    return result


def _host() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        lscpu = ""
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    import psutil

    return {
        "cpu": info.get("Model name", "").strip(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


if __name__ == "__main__":
    # `python -m doppel.benchmemory rescore RESULT.json`: a saved result with today's estimates.
    if sys.argv[1:2] != ["rescore"] or len(sys.argv) != 3:
        sys.exit("usage: python -m doppel.benchmemory rescore RESULT.json")
    print(json.dumps(rescore(json.loads(Path(sys.argv[2]).read_text())), indent=2))
