"""The SFT stage every recipe trains first: its LoRA config, TRL's SFTConfig, and the loop (checkpoints, resume, OOM).

The recipes call `train_sft` on rows they have fitted; the preference recipes then refine the adapter it returns.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

from jobspec.config import TrainConfig
from jobspec.errors import JobCancelled, TrainingError
from jobspec.events import Emitter


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
