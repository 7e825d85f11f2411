"""The benchmarks' torch work, in the trainer's own process: `python -m trainer bench-train|bench-memory|bench-shape|
perplexity ...`.

The shell side (`doppel/bench{train,memory,fidelity}.py`) builds the inputs, starts this as a child like any job's
and reads its one result line: a `finished` event on stdout with `status` "succeeded" and the `result`, or "failed"
and a one-line `error` (an unexpected error's traceback goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from jobspec.config import TrainConfig
from jobspec.events import Emitter


def add_parsers(sub: Any) -> None:
    """The benchmark commands of `python -m trainer`."""
    t = sub.add_parser(
        "bench-train", help="our SFT recipe against a plain HF Trainer + PEFT on the same rows"
    )
    t.add_argument("--quick", action="store_true", help="a wide random tiny model instead of the base")
    t.add_argument("--base-gguf", type=Path, help="the base model (GGUF); required without --quick")
    t.add_argument("--cache-dir", type=Path, help="where the GGUF's dequantized HF folder is cached")
    m = sub.add_parser("bench-memory", help="a plain HF Trainer + PEFT on a job folder's model and rows")
    m.add_argument("job_dir", type=Path)
    s = sub.add_parser("bench-shape", help="save a random-weight Qwen2 of a given config (memory bench)")
    s.add_argument("dest", type=Path)
    s.add_argument("--config", required=True, help="Qwen2Config fields as a JSON object")
    s.add_argument(
        "--tokenizer", type=Path, required=True, help="the GGUF or HF folder whose tokenizer to save"
    )
    d = sub.add_parser("dequantize", help="convert a GGUF base to its cached HF folder once (bench scale)")
    d.add_argument("base_gguf", type=Path)
    d.add_argument("cache_dir", type=Path)
    p = sub.add_parser("perplexity", help="perplexity of JSONL rows under a base and each named PEFT adapter")
    p.add_argument("base_model", type=Path)
    p.add_argument("rows", type=Path, help="JSON lines with prompt and completion")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER")
    p.add_argument("--cache-dir", type=Path, help="where a GGUF base's dequantized HF folder is cached")


COMMANDS = ("bench-train", "bench-memory", "bench-shape", "dequantize", "perplexity")


def _dequantize_command(args: argparse.Namespace) -> dict[str, Any]:
    """The base's float HF folder, converted now unless it is cached."""
    from trainer.basemodel import dequantized_folder

    return {"folder": str(dequantized_folder(args.base_gguf, args.cache_dir))}


def run(args: argparse.Namespace, emitter: Emitter) -> int:
    """Run one benchmark command; its result or its one-line error as a `finished` event. Exit 0 or 1."""
    work: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "bench-train": _train_command,
        "bench-memory": lambda a: memory_baseline(a.job_dir),
        "bench-shape": lambda a: build_shaped(a.dest, dict(json.loads(a.config)), a.tokenizer),
        "dequantize": _dequantize_command,
        "perplexity": _perplexity_command,
    }
    try:
        result = work[args.command](args)
    except UserFacingError as exc:
        emitter.emit("finished", status="failed", error=str(exc))
        return 1
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        emitter.emit("finished", status="failed", error=f"{type(exc).__name__}: {line}"[:500])
        return 1
    emitter.emit("finished", status="succeeded", result=result)
    return 0


def _train_command(args: argparse.Namespace) -> dict[str, Any]:
    if not args.quick and (args.base_gguf is None or args.cache_dir is None):
        raise UserFacingError("bench-train: --base-gguf and --cache-dir are required without --quick")
    return train_bench(args.quick, args.base_gguf, args.cache_dir)


def _perplexity_command(args: argparse.Namespace) -> dict[str, Any]:
    from jobspec.jobdata import read_jsonl

    adapters = {}
    for item in args.adapter:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise UserFacingError(f"perplexity: --adapter {item!r} is not NAME=FOLDER")
        adapters[name] = folder
    if not args.rows.is_file():
        raise UserFacingError(f"perplexity: no rows file at {args.rows}")
    return cross_perplexity(args.base_model, read_jsonl(args.rows), adapters, args.cache_dir)


# -- bench-train ------------------------------------------------------------------------------------------------
def train_bench(quick: bool, gguf: Path | None, cache_dir: Path | None) -> dict[str, Any]:
    """Trained (non-pad) tokens/s and padding fraction: our SFT pipeline vs plain HF Trainer + PEFT, same data."""
    import torch

    from core.chatformat import ChatFormat
    from jobspec.jobdata import fit_rows
    from trainer.basemodel import dequantized_folder, load_tokenizer
    from trainer.synthetic import synthetic_rows
    from trainer.tinymodel import build_tiny

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="doppel-bench-train-") as tmp:
        if quick or gguf is None or cache_dir is None:
            # Wide enough that compute, not per-step Python overhead, dominates, as with a real base model.
            tiny = build_tiny(Path(tmp) / "tiny", hidden=384, layers=4, heads=6, kv_heads=2)
            model_dir, model_name = tiny.hf_dir, "tiny-llama (random, hidden 384, 4 layers, 512 vocab)"
            n, micro, lr = 128, 8, 1e-3
        else:
            model_dir, model_name = dequantized_folder(gguf, cache_dir), gguf.name
            n, micro, lr = 96, 4, 2e-4
        tokenizer = load_tokenizer(model_dir)
        # Long-tailed context sizes, as in real channels: most replies answer one line, a few a long exchange.
        rows = synthetic_rows(n, seed=5, chat_format=ChatFormat.from_tokenizer(tokenizer), long_tail=True)
        rows, _ = fit_rows(rows, tokenizer, 512)
        steps = len(rows) // micro
        cfg = TrainConfig(
            base_model=str(model_dir),
            max_steps=steps,
            micro_batch_size=micro,
            learning_rate=lr,
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            save_steps=10 * steps,
            max_length=512,
            logging_steps=max(steps, 1),
        ).validate()
        job = Path(tmp) / "job"
        job.mkdir()
        # Unmeasured: the first training in a process pays for thread pools, kernel selection and the allocator.
        baseline_run(replace(cfg, max_steps=2), model_dir, tokenizer, rows, job / "warmup")
        # A-B-B-A order: the machine's load drifts (other processes), and each side sees the same drift.
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ours": [], "ours_length_grouped": []}
        for i, name in enumerate(
            ("baseline", "ours", "ours_length_grouped", "ours_length_grouped", "ours", "baseline")
        ):
            if name == "baseline":
                runs[name].append(baseline_run(cfg, model_dir, tokenizer, rows, job / f"run{i}"))
            else:
                run_cfg = replace(cfg, batching="length_grouped") if name != "ours" else cfg
                runs[name].append(our_run(run_cfg, model_dir, rows, job / f"run{i}"))
        baseline, ours, grouped = (_merge(runs[k]) for k in ("baseline", "ours", "ours_length_grouped"))
    speedup = ours["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"]
    wall_speedup = ours["tokens_per_s"] / baseline["tokens_per_s"]
    return {
        "model": model_name,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": threads,
        "examples": len(rows),
        "steps": steps,
        "micro_batch_size": micro,
        "lora_r": cfg.lora_r,
        "ours": ours,
        "ours_length_grouped": grouped,
        "baseline": baseline,
        "speedup_tokens_per_cpu_s": round(speedup, 3),
        "speedup_tokens_per_wall_s": round(wall_speedup, 3),
        "speedup_measure": "trained (non-pad) tokens per CPU-second of the training loop, each side run twice (ABBA)",
        "target_speedup": 1.5,
        "meets_target": speedup >= 1.5,
    }


def our_run(cfg: TrainConfig, model_dir: Path, rows: list[dict[str, Any]], job: Path) -> dict[str, Any]:
    """The product's SFT recipe on `rows`: its throughput and padding."""
    from trainer.basemodel import load_base
    from trainer.sftstage import train_sft

    base = load_base(model_dir, quantize_4bit=cfg.quantize_4bit)
    _, stats = train_sft(
        cfg,
        job / "ours",
        base.model,
        base.tokenizer,
        rows,
        Emitter(),
        threading.Event(),
        resume=False,
        device=base.device,
    )
    return {
        "pipeline": f"TRL SFTTrainer + PEFT, completion-only loss, batching={cfg.batching}",
        "seconds": stats["train_seconds"],
        "cpu_seconds": stats["cpu_seconds"],
        "trained_tokens": stats["real_tokens"],
        "padding_fraction": stats["padding_fraction"],
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["trained_tokens"] for r in runs)
    wall = sum(r["seconds"] for r in runs)
    cpu = sum(r["cpu_seconds"] for r in runs)
    return {
        "pipeline": runs[0]["pipeline"],
        "runs": len(runs),
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "trained_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1),
        "padding_fraction": runs[0]["padding_fraction"],
    }


def baseline_run(
    cfg: TrainConfig, model_dir: Path, tokenizer: Any, rows: list[dict[str, Any]], job: Path
) -> dict[str, Any]:
    """HF `Trainer` + PEFT, dynamic padding to the longest in each batch, random order: the plain way."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from trainer.sftstage import lora_config

    set_seed(cfg.seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), lora_config(cfg)
    )
    features = []
    for r in rows:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        features.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    counts = {"real": 0, "padded": 0}

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in batch])
        labels = torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in batch])
        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in batch])
        counts["real"] += int(mask.sum())
        counts["padded"] += int(mask.numel())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    targs = TrainingArguments(
        output_dir=str(job / "baseline"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        learning_rate=cfg.learning_rate,
        logging_steps=cfg.max_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        bf16=torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=features, data_collator=collate)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "pipeline": "HF Trainer + PEFT, dynamic padding, random order",
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "trained_tokens": counts["real"],
        "padding_fraction": round(1 - counts["real"] / counts["padded"], 4) if counts["padded"] else 0.0,
    }


# -- bench-memory, bench-shape ----------------------------------------------------------------------------------
def memory_baseline(job: Path) -> dict[str, Any]:
    """The baseline in this process: the job's fitted rows, its micro-batch and steps, HF Trainer + PEFT."""
    from jobspec.jobdata import fit_rows, job_format, load_job_data
    from trainer.basemodel import dequantized_folder, load_tokenizer
    from trainer.meter import PhaseMeter

    if not (job / "config.json").is_file():
        raise UserFacingError(f"bench-memory: no job folder at {job}")
    cfg = TrainConfig.from_json(job / "config.json")
    model_dir = Path(cfg.base_model)
    if model_dir.suffix == ".gguf":
        model_dir = dequantized_folder(model_dir, Path(cfg.base_cache_dir))
    tokenizer = load_tokenizer(model_dir)
    rows, _ = fit_rows(load_job_data(job).train, tokenizer, cfg.max_length, job_format(cfg))
    # Gradient accumulation is not the baseline's business: the same examples per step, in one micro-batch each.
    run_cfg = replace(cfg, max_steps=cfg.max_steps * cfg.grad_accum)
    rows = rows[: run_cfg.max_steps * cfg.micro_batch_size]
    out = baseline_run(run_cfg, model_dir, tokenizer, rows, job / "baseline")
    out["tokens_per_s"] = round(out["trained_tokens"] / out["seconds"], 1) if out["seconds"] else None
    # This process's own high-water mark (VmHWM), as the child reports its own: not ru_maxrss, which Linux carries
    # across execve from the process that started it.
    out["peak_rss_mb"] = PhaseMeter().report()["peak_mb"]
    return out


def build_shaped(dest: Path, config: Mapping[str, Any], tokenizer_from: Path) -> dict[str, Any]:
    """Save a float32 Qwen2 of `config` with `tokenizer_from`'s tokenizer (real chat tokenizes as it really does)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, set_seed

    from trainer.basemodel import load_tokenizer

    set_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype="float32")
    model.save_pretrained(str(dest))
    load_tokenizer(tokenizer_from).save_pretrained(str(dest))
    return {"built": str(dest)}


# -- perplexity -------------------------------------------------------------------------------------------------
def cross_perplexity(
    base_model: Path, rows: Sequence[Mapping[str, Any]], adapters: Mapping[str, str], cache_dir: Path | None
) -> dict[str, Any]:
    """Perplexity of `rows` under the base the adapters were trained on and under each named PEFT adapter folder."""
    from peft import PeftModel

    from trainer.basemodel import load_base
    from trainer.evaluation import perplexity

    if not base_model.exists():
        raise UserFacingError(f"perplexity: no base model at {base_model}")
    base = load_base(base_model, quantize_4bit=False, gradient_checkpointing=False, cache_root=cache_dir)
    out: dict[str, Any] = {"rows": len(rows), "base": round(perplexity(base.model, base.tokenizer, rows), 3)}
    for name, folder in adapters.items():
        model = PeftModel.from_pretrained(base.model, folder)
        try:
            out[name] = round(perplexity(model, base.tokenizer, rows), 3)
        finally:
            base.model = model.unload()  # the base without this adapter, for the next one
    return out
