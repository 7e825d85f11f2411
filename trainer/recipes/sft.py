"""SFT recipe: LoRA (QLoRA on CUDA) with TRL's SFTTrainer on prompt/completion rows; setup -> train -> save."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobspec.config import TrainConfig
from jobspec.errors import EvaluationError, ExportError, JobCancelled, TrainingError
from jobspec.events import Emitter


def run(
    cfg: TrainConfig,
    job_dir: Path,
    emitter: Emitter,
    cancel: threading.Event,
    *,
    resume: bool = False,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Train the persona adapter, evaluate it, and publish the adapter folder; returns the artifact summary."""
    from jobspec.jobdata import fit_rows, job_format, load_job_data, weighted_rows
    from trainer.basemodel import load_base
    from trainer.meter import METER

    # --- setup
    setup_torch(cfg)
    data = load_job_data(job_dir, key)
    emitter.emit("phase", phase="loading base model")
    METER.enter("loading")
    base = load_base(
        Path(cfg.base_model),
        quantize_4bit=cfg.quantize_4bit,
        gradient_checkpointing=cfg.gradient_checkpointing,
        cache_root=Path(cfg.base_cache_dir) if cfg.base_cache_dir else None,
    )
    METER.enter("dataset")
    rows, dropped = fit_rows(data.train, base.tokenizer, cfg.max_length, job_format(cfg))
    cfg = cfg.for_rows(rows)  # steps from the member's data: its size and, under a token budget, its length
    # Reaction weighting works by sampling, so the loss stays TRL's own (completion-only, EOS included).
    rows = weighted_rows(rows, cfg.seed)
    if not rows:
        raise TrainingError(f"no training example fits max_length={cfg.max_length} tokens")
    if cancel.is_set():
        raise JobCancelled("cancelled before training started")
    # --- train
    model, stats = train_sft(
        cfg, job_dir, base.model, base.tokenizer, rows, emitter, cancel, resume=resume, device=base.device
    )
    stats.update(examples=len(rows), dropped_too_long=dropped, device=base.device, quantized=base.quantized)
    # --- save
    return finish_job(
        cfg, job_dir, model, base.tokenizer, data, emitter, stats=stats, stages={"sft": stats}, cancel=cancel
    )


def setup_torch(cfg: TrainConfig) -> None:
    """Threads, seeds and the allocator, before any model is built."""
    from trainer.meter import limit_allocator

    limit_allocator()  # before torch starts threads: each would otherwise get an arena of its own
    import torch
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)


def lora_config(cfg: TrainConfig, model: Any = None) -> Any:
    """The PEFT LoraConfig of this job (targets renamed to `model`'s fused projections where it has them)."""
    from peft import LoraConfig

    from trainer.export_gguf import lora_targets

    arch = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(arch, cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_args(cfg: TrainConfig, job_dir: Path, *, micro: int, accum: int, device: str) -> Any:
    """SFTConfig: completion-only loss, padding-free or length-grouped batches, checkpoints in JOB_DIR/checkpoints."""
    from trl import SFTConfig

    if cfg.tensorboard:
        # transformers 5 dropped `logging_dir`; its TensorBoard callback reads this variable instead.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(job_dir / "tensorboard")
    return SFTConfig(
        output_dir=str(job_dir / "checkpoints"),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Rows are already fitted to max_length by dropping old context (jobdata.fit_rows); TRL's own truncation
        # would cut the end-of-turn token, and padding-free mode refuses it anyway.
        max_length=None if cfg.batching == "padding_free" else cfg.max_length,
        completion_only_loss=True,
        # Padding-free: concatenated examples never attend to each other; train_sft runs attention per example
        # (trainer.attention) where transformers would otherwise mask the whole row block-diagonally.
        padding_free=cfg.batching == "padding_free",
        train_sampling_strategy="group_by_length" if cfg.batching == "length_grouped" else "random",
        include_num_input_tokens_seen="non_padding",
        bf16=device == "cuda",
        # On a CPU too: a block's activations are recomputed in the backward pass, so a micro-batch keeps each
        # block's input and one block's intermediates (SmolLM2-135M, 8 real-chat examples: see BENCHMARKS.md,
        # memory) instead of every block's, for about a quarter more compute per step.
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=["tensorboard"] if cfg.tensorboard else "none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
    )


def train_sft(
    cfg: TrainConfig,
    job_dir: Path,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    emitter: Emitter,
    cancel: threading.Event,
    *,
    resume: bool,
    device: str,
) -> tuple[Any, dict[str, Any]]:
    """Run SFT with checkpoints, resume and the CUDA OOM fallback; returns the PEFT model and stats."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model

    from trainer.attention import segments_for
    from trainer.callbacks import CountingCollator, JobCallback, host_share, last_checkpoint, loss_points
    from trainer.lmhead import PersonaSFTTrainer
    from trainer.meter import METER

    peft_model = get_peft_model(model, lora_config(cfg, model))
    initial = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    micro, accum = cfg.micro_batch_size, cfg.grad_accum
    checkpoint = last_checkpoint(job_dir / "checkpoints") if resume else None
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    emitter.emit(
        "started",
        stage="sft",
        total=cfg.max_steps,
        step=resumed_from,
        resumed_from_step=resumed_from,
        examples=len(rows),
        device=device,
        micro_batch_size=micro,
        grad_accum=accum,
    )
    t0 = time.monotonic()
    # Inside trainer.train() only (dataset preparation is not training throughput); CPU time as well as wall time,
    # since on a shared CPU machine wall time mostly measures the neighbours.
    train_s = cpu_s = 0.0
    real_tokens = 0
    while True:
        callback = JobCallback(
            emitter,
            cancel,
            stage="sft",
            oom_at_step=cfg.simulate_oom_at_step,
            oom_marker=job_dir / "checkpoints" / ".oom-simulated",
            **host_share(cfg),
        )
        trainer = PersonaSFTTrainer(
            model=peft_model,
            args=sft_args(cfg, job_dir, micro=micro, accum=accum, device=device),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[callback],
        )
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        t_train, c_train = time.monotonic(), time.process_time()
        METER.enter("training")
        try:
            with segments_for(peft_model.get_base_model(), cfg.batching == "padding_free"):
                callback.train(trainer, resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            break
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise TrainingError(
                    "CUDA out of memory even with micro-batch 1: lower max_length or lora_r"
                ) from None
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Same effective batch, half the activations: the optimizer sees the same schedule after the retry.
            micro, accum = micro // 2, accum * 2
            train_s += time.monotonic() - t_train
            cpu_s += time.process_time() - c_train
            real_tokens += counter.real
            checkpoint = last_checkpoint(job_dir / "checkpoints")
            if checkpoint is None:
                peft_model.load_state_dict(initial, strict=False)
            emitter.emit(
                "oom_retry",
                micro_batch_size=micro,
                grad_accum=accum,
                resume_from_step=int(checkpoint.name.split("-")[1]) if checkpoint else 0,
            )
    train_s += time.monotonic() - t_train
    cpu_s += time.process_time() - c_train
    real_tokens += counter.real
    if callback.cancelled:
        raise JobCancelled(f"cancelled at step {trainer.state.global_step}; checkpoint saved")
    elapsed = time.monotonic() - t0
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    stats = {
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "micro_batch_size": micro,
        "grad_accum": accum,
        "seconds": round(elapsed, 2),
        "train_seconds": round(train_s, 2),
        "cpu_seconds": round(cpu_s, 2),
        "trained_tokens": tokens,
        # Counted at the collator, this run only: num_input_tokens_seen skips tokens equal to the pad token, which
        # for many chat models is the end-of-turn token every example trains on.
        "real_tokens": real_tokens,
        "tokens_per_s": round(real_tokens / train_s, 1) if train_s > 0 else None,
        "padding_fraction": counter.padding_fraction,
        "losses": loss_points(trainer.state.log_history),
    }
    return trainer.model, stats


def base_gguf_for(cfg: TrainConfig) -> Path | None:
    """The GGUF llama.cpp serves this adapter on (to validate the export), if one is known."""
    if cfg.base_gguf:
        return Path(cfg.base_gguf)
    if cfg.base_model.endswith(".gguf"):
        return Path(cfg.base_model)
    return None


def finish_job(
    cfg: TrainConfig,
    job_dir: Path,
    model: Any,
    tokenizer: Any,
    data: Any,
    emitter: Emitter,
    *,
    stats: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Save and announce the adapter folder, then evaluate it (llama.cpp generates from its GGUF) and update it.

    The adapter is complete on disk and announced (`artifact` with `evaluated: false`) before evaluation starts:
    if evaluation then dies (out of memory, a bug, a signal), the supervisor publishes it as a candidate with
    "evaluation failed: <why>" and `doppel eval` runs the evaluation again later. Training is never lost to it.
    """
    from trainer import report
    from trainer.adapter_folder import StagedAdapter, export_gguf
    from trainer.basemodel import file_sha256
    from trainer.export_gguf import BaseInfo
    from trainer.meter import METER
    from trainer.plot import loss_png

    check = stop_check(cancel, "during evaluation: the trained adapter is kept, `doppel eval` evaluates it")
    stop_check(cancel, "before the export: resume continues from the last checkpoint")()
    emitter.emit("phase", phase="exporting")
    train_peak = peak_rss_mb()
    METER.enter("export")
    staged = StagedAdapter(job_dir / "output" / "adapter")
    export_error: str | None = None
    try:
        model.save_pretrained(str(staged.path), safe_serialization=True)
        try:
            export = export_gguf(
                staged.path,
                staged.path / "adapter.gguf",
                BaseInfo.from_hf_config(model.config),
                gguf_dtype=cfg.gguf_dtype,
                simulate_failure=cfg.simulate_export_failure,
            )
        except ExportError as exc:
            # The training is done and its PEFT files are saved: keep them (a candidate, "export failed: <why>");
            # `doppel eval` converts and evaluates them later. Users report GGUF export failures often.
            export_error, export = str(exc), {"error": str(exc)}
        loss_series = [(name, s.get("losses", [])) for name, s in stages.items() if name != "sft"]
        loss_png(
            staged.path / "loss.png",
            stats.get("losses", []),
            title=f"{cfg.persona_name or cfg.member_id} ({cfg.mode})",
            stages=loss_series,
        )
        meta = {
            "member": cfg.member_id or None,
            "persona_name": cfg.persona_name,
            "mode": cfg.mode,
            "base_model": {
                "name": cfg.base_name,
                "path": cfg.base_model,
                "sha256": file_sha256(Path(cfg.base_model)),
                "gguf": str(base_gguf_for(cfg) or ""),
            },
            "training_config": cfg.to_dict(),
            "data": {k: data.meta.get(k) for k in ("window", "counts", "lineage", "member")},
            "lineage": list(data.meta.get("lineage") or []),
            "training": {name: {k: v for k, v in s.items() if k != "losses"} for name, s in stages.items()},
            "losses": {name: s.get("losses", []) for name, s in stages.items()},
            "metrics": {"evaluation": "pending", "active": False, "gate_reason": "not evaluated yet"},
            "export": export,
            # The chat format the dataset was rendered with: serving must use the same (see inference.runtime).
            "chat_format": _chat_format_record(cfg),
        }
        staged.write_meta(meta)
        path = staged.publish(require_gguf=export_error is None)
    except BaseException:
        staged.discard()
        raise
    if export_error is not None:
        emitter.emit(
            "artifact", kind="adapter", path=str(path), gguf=None, evaluated=False, export_error=export_error
        )
        raise ExportError(export_error)
    emitter.emit("artifact", kind="adapter", path=str(path), gguf=str(path / "adapter.gguf"), evaluated=False)
    emitter.emit("phase", phase="evaluating")
    simulate_eval_failure(cfg.simulate_eval_failure)
    # A stop from here on ends the evaluation at its next batch or prompt; the announced adapter is kept.
    metrics = report.evaluate(
        model,
        tokenizer,
        cfg,
        data,
        adapter_gguf=path / "adapter.gguf",
        base_gguf=base_gguf_for(cfg),
        check=check,
    )
    metrics["evaluation"] = "done"
    # The peak of the whole life of the process: read after training, then after evaluation; and per phase.
    measured = METER.report()
    metrics["resources"] = {
        "train_peak_rss_mb": train_peak,
        "peak_rss_mb": peak_rss_mb(),
        "estimate_mb": estimate_mb(cfg, str(stats.get("device") or "cpu"), model),
        "floor_mb": floor_mb(cfg, model, stats),
        "phases_mb": measured["phases_mb"],
        **({"vram_phases_mb": measured["vram_phases_mb"]} if "vram_phases_mb" in measured else {}),
    }
    update_meta(path, metrics=metrics)
    emitter.emit("metrics", **{k: v for k, v in metrics.items()})
    emitter.emit(
        "artifact",
        kind="adapter",
        path=str(path),
        gguf=str(path / "adapter.gguf"),
        evaluated=True,
        active=metrics.get("active"),
        gate_reason=metrics.get("gate_reason"),
    )
    return {
        "adapter": str(path),
        "metrics": metrics,
        "training": meta["training"],
        "peak_rss_mb": metrics["resources"]["peak_rss_mb"],
    }


def stop_check(cancel: threading.Event | None, where: str) -> Callable[[], None]:
    """A check that raises `JobCancelled` ("stopped <where>") once `cancel` is set; the evaluation calls it often."""

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise JobCancelled(f"stopped {where}")

    return check


def _chat_format_record(cfg: TrainConfig) -> dict[str, str] | None:
    from core.chatformat import ChatFormat

    try:
        return dict(ChatFormat.for_config(cfg.to_dict()).to_dict())
    except Exception:
        return None


def simulate_eval_failure(kind: str) -> None:
    """Testing hook: fail evaluation the way a bug ('error') or the OOM killer ('kill') would."""
    if kind == "error":
        raise EvaluationError("simulated evaluation failure")
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def update_meta(folder: Path, **fields: Any) -> dict[str, Any]:
    """Rewrite fields of an adapter folder's meta.json atomically (a reader sees the old or the new file)."""
    import json

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta.update(fields)
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "meta.json")
    return meta


def estimate_mb(cfg: TrainConfig, device: str, model: Any = None) -> dict[str, float] | None:
    """The pre-flight's estimate for this job (training, evaluation, peak) in MiB, to compare with the measured peak.

    From the GGUF header as pre-flight reads it; a base known only as a HF folder is shaped from `model`'s config.
    """
    from jobspec.memory import memory_breakdown

    shape = _shape(cfg, model)
    if shape is None:
        return None
    try:
        phases = memory_breakdown(shape, cfg, device)
    except Exception:
        return None
    return {k: round(v / 2**20, 1) for k, v in phases.items()}


def floor_mb(cfg: TrainConfig, model: Any, stats: dict[str, Any]) -> float | None:
    """What training could not do without, in MiB: weights, LoRA state, one mean micro-batch's activations."""
    from jobspec.memory import floor_bytes

    shape = _shape(cfg, model)
    batches = int(stats.get("steps") or 0) * int(stats.get("grad_accum") or cfg.grad_accum)
    if shape is None or not batches:
        return None
    tokens = max(1, int(stats.get("real_tokens") or 0) // batches)
    return round(floor_bytes(shape, cfg, tokens) / 2**20, 1)


def _shape(cfg: TrainConfig, model: Any) -> Any:
    from core.ggufinfo import ModelShape, read_shape

    gguf = base_gguf_for(cfg)
    if gguf is not None and gguf.is_file():
        try:
            return read_shape(gguf)
        except Exception:
            return None
    config = getattr(model, "config", None)
    if config is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    return ModelShape(
        architecture=str(config.model_type),
        params=int(params),
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        vocab=int(config.vocab_size),
        context=int(getattr(config, "max_position_embeddings", 0) or 0),
        file_bytes=0,
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    import sys

    from trainer.meter import METER

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The phase meter resets the kernel's high-water mark at each phase; it keeps the lifetime peak itself.
    own = float(METER.report()["peak_mb"]) if sys.platform != "darwin" else 0.0
    if own > 0:
        # VmHWM is this program's own: Linux carries ru_maxrss across execve, so a trainer started by a large
        # process (the bot, a test runner at 1.6 GB) would report its parent's peak as its own.
        return own
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def reevaluate(
    cfg: TrainConfig, job_dir: Path, adapter_dir: Path, emitter: Emitter, *, key: bytes | None = None
) -> dict[str, Any]:
    """Evaluate a saved adapter folder again (its first evaluation failed); the metrics go out as an event only.

    The child writes nothing into the adapter folder: the parent records the metrics through the registry.
    """
    from peft import PeftModel

    from jobspec.jobdata import load_job_data
    from trainer import report
    from trainer.basemodel import load_base

    setup_torch(cfg)
    data = load_job_data(job_dir, key, need_train=False)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TrainingError(f"{adapter_dir}: not an adapter folder (adapter_config.json missing)")
    emitter.emit("phase", phase="loading base model")
    base = load_base(
        Path(cfg.base_model),
        quantize_4bit=cfg.quantize_4bit,
        gradient_checkpointing=False,
        cache_root=Path(cfg.base_cache_dir) if cfg.base_cache_dir else None,
    )
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    loaded_peak = peak_rss_mb()
    gguf = adapter_dir / "adapter.gguf"
    if not gguf.is_file():
        # Its export failed after training: convert it now, into the job folder; the parent copies it in.
        from trainer.adapter_folder import export_gguf
        from trainer.export_gguf import BaseInfo

        emitter.emit("phase", phase="exporting")
        gguf = job_dir / "output" / "adapter.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        export = export_gguf(
            adapter_dir, gguf, BaseInfo.from_hf_config(model.config), gguf_dtype=cfg.gguf_dtype
        )
        emitter.emit("artifact", kind="gguf", path=str(gguf), export=export)
    emitter.emit("phase", phase="evaluating")
    simulate_eval_failure(cfg.simulate_eval_failure)
    metrics = report.evaluate(
        model, base.tokenizer, cfg, data, adapter_gguf=gguf, base_gguf=base_gguf_for(cfg)
    )
    metrics["evaluation"] = "done"
    metrics["resources"] = {"loaded_peak_rss_mb": loaded_peak, "peak_rss_mb": peak_rss_mb()}
    emitter.emit("metrics", **{k: v for k, v in metrics.items()})
    return {"adapter": str(adapter_dir), "metrics": metrics}
