"""SFT then DPO recipe: the SFT adapter is refined on pairs (a reacted vs an unreacted reply to one context)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from jobspec.config import TrainConfig
from jobspec.errors import JobCancelled
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
    """SFT (resumable), then DPO from the SFT adapter, then evaluate and publish."""
    from jobspec.jobdata import fit_pairs
    from trainer.jobrun import finish_job, start_job
    from trainer.sftstage import train_sft

    # --- start: the job's data, the base, the SFT rows that fit
    start = start_job(cfg, job_dir, emitter, cancel, key)
    cfg, base, rows = start.cfg, start.base, start.rows
    dpo_rows = [
        r
        for r in start.data.preference
        if r.get("kind", "dpo") == "dpo"
        and isinstance(r.get("chosen"), str)
        and isinstance(r.get("rejected"), str)
    ]
    # Fitted like the SFT rows (oldest context dropped): TRL's truncation would cut the system prompt or a reply.
    dpo_rows, dropped_pairs = fit_pairs(dpo_rows, base.tokenizer, cfg.max_length, start.fmt)
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in dpo_rows]
    # --- train: SFT
    model, sft_stats = train_sft(
        cfg, job_dir, base.model, base.tokenizer, rows, emitter, cancel, resume=resume, device=base.device
    )
    # --- train: DPO
    if not pairs:
        emitter.emit("phase", phase="dpo skipped: no preference pairs")
        dpo_stats: dict[str, Any] = {"skipped": "no preference pairs", "losses": []}
    else:
        model, dpo_stats = _train_dpo(
            cfg, job_dir, model, base.tokenizer, pairs, emitter, cancel, base.device
        )
        dpo_stats["dropped_too_long"] = dropped_pairs
    # --- finish: export, evaluate, report
    stages = {"sft": start.sft_stats(sft_stats, len(rows)), "dpo": dpo_stats}
    return finish_job(start, job_dir, model, emitter, stages=stages, cancel=cancel)


def _train_dpo(
    cfg: TrainConfig,
    job_dir: Path,
    model: Any,
    tokenizer: Any,
    pairs: list[dict[str, Any]],
    emitter: Emitter,
    cancel: threading.Event,
    device: str,
) -> tuple[Any, dict[str, Any]]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trainer.callbacks import JobCallback, host_share, loss_points

    args = DPOConfig(
        output_dir=str(job_dir / "checkpoints-dpo"),
        max_steps=cfg.pref_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.pref_learning_rate,
        beta=cfg.pref_beta,
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=device == "cuda" and cfg.gradient_checkpointing,
    )
    emitter.emit("started", stage="dpo", total=cfg.pref_steps, step=0, examples=len(pairs))
    callback = JobCallback(emitter, cancel, stage="dpo", **host_share(cfg))
    # The SFT adapter is the policy; TRL copies it into a frozen "ref" adapter, so DPO's reference is the SFT model.
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    t0 = time.monotonic()
    callback.train(trainer)  # a cancel ends it mid-step
    if callback.cancelled:
        raise JobCancelled(f"cancelled during DPO at step {trainer.state.global_step}")
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    model.set_adapter("default")
    return model, {
        "steps": trainer.state.global_step,
        "pairs": len(pairs),
        "train_seconds": round(time.monotonic() - t0, 2),
        "losses": loss_points(trainer.state.log_history),
    }
