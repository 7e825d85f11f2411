"""SFT then KTO recipe: the SFT adapter is refined on unpaired 👍/👎 and reaction signals; start -> train -> finish."""

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
    """SFT (resumable), then KTO from the SFT adapter, then evaluate and publish."""
    from jobspec.jobdata import fit_rows
    from trainer.jobrun import finish_job, start_job
    from trainer.sftstage import train_sft

    # --- start: the job's data, the base, the SFT rows that fit
    start = start_job(cfg, job_dir, emitter, cancel, key)
    cfg, base, rows = start.cfg, start.base, start.rows
    kto_rows = [
        r
        for r in start.data.preference
        if r.get("kind", "kto") == "kto" and isinstance(r.get("completion"), str) and "label" in r
    ]
    # Fitted like the SFT rows (oldest context dropped): TRL's truncation would cut the system prompt or the reply.
    kto_rows, dropped_signals = fit_rows(kto_rows, base.tokenizer, cfg.max_length, start.fmt)
    signals = [
        {"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in kto_rows
    ]
    # --- train: SFT
    model, sft_stats = train_sft(
        cfg, job_dir, base.model, base.tokenizer, rows, emitter, cancel, resume=resume, device=base.device
    )
    # --- train: KTO (needs both kinds of signal: KTO contrasts desirable against undesirable completions)
    labels = {s["label"] for s in signals}
    if labels != {True, False}:
        reason = "no preference signals" if not signals else "signals are all of one kind"
        emitter.emit("phase", phase=f"kto skipped: {reason}")
        kto_stats: dict[str, Any] = {"skipped": reason, "losses": []}
    else:
        model, kto_stats = _train_kto(
            cfg, job_dir, model, base.tokenizer, signals, emitter, cancel, base.device
        )
        kto_stats["dropped_too_long"] = dropped_signals
    # --- finish: export, evaluate, report
    stages = {"sft": start.sft_stats(sft_stats, len(rows)), "kto": kto_stats}
    return finish_job(start, job_dir, model, emitter, stages=stages, cancel=cancel)


def _train_kto(
    cfg: TrainConfig,
    job_dir: Path,
    model: Any,
    tokenizer: Any,
    signals: list[dict[str, Any]],
    emitter: Emitter,
    cancel: threading.Event,
    device: str,
) -> tuple[Any, dict[str, Any]]:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from trainer.callbacks import JobCallback, host_share, loss_points

    args = KTOConfig(
        output_dir=str(job_dir / "checkpoints-kto"),
        max_steps=cfg.pref_steps,
        # KTO estimates its KL baseline from mismatched pairs inside a batch: a batch of one has none.
        per_device_train_batch_size=max(2, cfg.micro_batch_size),
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
    emitter.emit("started", stage="kto", total=cfg.pref_steps, step=0, examples=len(signals))
    callback = JobCallback(emitter, cancel, stage="kto", **host_share(cfg))
    # The SFT adapter is the policy; TRL copies it into a frozen "ref" adapter, so KTO's reference is the SFT model.
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(signals),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    t0 = time.monotonic()
    callback.train(trainer)  # a cancel ends it mid-step
    if callback.cancelled:
        raise JobCancelled(f"cancelled during KTO at step {trainer.state.global_step}")
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
    model.set_adapter("default")
    return model, {
        "steps": trainer.state.global_step,
        "signals": len(signals),
        "desirable": sum(s["label"] for s in signals),
        "train_seconds": round(time.monotonic() - t0, 2),
        "losses": loss_points(trainer.state.log_history),
    }
