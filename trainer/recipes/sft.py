"""SFT recipe: LoRA (QLoRA on CUDA) with TRL's SFTTrainer on prompt/completion rows; start -> train -> finish."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from jobspec.config import TrainConfig
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
    from jobspec.jobdata import weighted_rows
    from trainer.jobrun import finish_job, start_job
    from trainer.sftstage import train_sft

    # --- start: the job's data, the base, the rows that fit
    start = start_job(cfg, job_dir, emitter, cancel, key)
    cfg, base = start.cfg, start.base
    # Reaction weighting works by sampling, so the loss stays TRL's own (completion-only, EOS included).
    rows = weighted_rows(start.rows, cfg.seed)
    # --- train
    model, stats = train_sft(
        cfg, job_dir, base.model, base.tokenizer, rows, emitter, cancel, resume=resume, device=base.device
    )
    # --- finish: export, evaluate, report
    return finish_job(
        start, job_dir, model, emitter, stages={"sft": start.sft_stats(stats, len(rows))}, cancel=cancel
    )
