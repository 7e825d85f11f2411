"""What every recipe shares around its training: the start (torch, the job's data, the base, the fitted rows) and the
finish (save, export, evaluate, report), and `reevaluate`, which evaluates a saved adapter again."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chatformat import ChatFormat
from jobspec.config import TrainConfig
from jobspec.errors import EvaluationError, ExportError, JobCancelled, TrainingError
from jobspec.events import Emitter
from jobspec.jobdata import JobData
from trainer.basemodel import LoadedBase


@dataclass
class JobStart:
    """A job ready to train: its config sized by its rows, its data, the loaded base and the SFT rows that fit."""

    cfg: TrainConfig
    data: JobData
    base: LoadedBase
    fmt: (
        ChatFormat | None
    )  # the format the dataset was rendered in: context is dropped by re-rendering with it
    rows: list[dict[str, Any]]
    dropped: int  # training rows too long even with all their context dropped

    def sft_stats(self, stats: dict[str, Any], examples: int) -> dict[str, Any]:
        """The SFT stage's stats with what the start knows: examples, rows dropped, the device, quantization."""
        stats.update(
            examples=examples,
            dropped_too_long=self.dropped,
            device=self.base.device,
            quantized=self.base.quantized,
        )
        return stats


def start_job(
    cfg: TrainConfig, job_dir: Path, emitter: Emitter, cancel: threading.Event, key: bytes | None
) -> JobStart:
    """Set up torch, read the job folder, load the base and fit the training rows to `max_length`."""
    from jobspec.jobdata import fit_rows, job_format, load_job_data
    from trainer.basemodel import load_base
    from trainer.meter import METER

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
    fmt = job_format(cfg)
    rows, dropped = fit_rows(data.train, base.tokenizer, cfg.max_length, fmt)
    cfg = cfg.for_rows(rows)  # steps from the member's data: its size and, under a token budget, its length
    if not rows:
        raise TrainingError(f"no training example fits max_length={cfg.max_length} tokens")
    if cancel.is_set():
        raise JobCancelled("cancelled before training started")
    return JobStart(cfg=cfg, data=data, base=base, fmt=fmt, rows=rows, dropped=dropped)


def setup_torch(cfg: TrainConfig) -> None:
    """Threads, seeds and the allocator, before any model is built."""
    from trainer.meter import limit_allocator

    limit_allocator()  # before torch starts threads: each would otherwise get an arena of its own
    import torch
    from transformers import set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)


def finish_job(
    start: JobStart,
    job_dir: Path,
    model: Any,
    emitter: Emitter,
    *,
    stages: dict[str, dict[str, Any]],
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Save and announce the adapter folder, then evaluate it (llama.cpp generates from its GGUF) and update it.

    The adapter is complete on disk and announced (`artifact` with `evaluated: false`) before evaluation starts:
    if evaluation then dies (out of memory, a bug, a signal), the supervisor publishes it as a candidate with
    "evaluation failed: <why>" and `doppel eval` runs the evaluation again later. Training is never lost to it.
    `stages` are the stats of each training stage, SFT's first: its losses draw the plot, its resources the floor.
    """
    from trainer import report
    from trainer.meter import METER, job_resources, peak_rss_mb

    cfg, stats = start.cfg, stages["sft"]
    check = stop_check(cancel, "during evaluation: the trained adapter is kept, `doppel eval` evaluates it")
    stop_check(cancel, "before the export: resume continues from the last checkpoint")()
    emitter.emit("phase", phase="exporting")
    train_peak = peak_rss_mb()
    METER.enter("export")
    path, meta, export_error = _publish(cfg, job_dir, model, start.data, stages)
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
        start.base.tokenizer,
        cfg,
        start.data,
        adapter_gguf=path / "adapter.gguf",
        base_gguf=base_gguf_for(cfg),
        check=check,
    )
    metrics["evaluation"] = "done"
    # The peak of the whole life of the process: read after training, then after evaluation; and per phase.
    metrics["resources"] = job_resources(
        cfg, model, stats, base_gguf=base_gguf_for(cfg), train_peak=train_peak
    )
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


def _publish(
    cfg: TrainConfig, job_dir: Path, model: Any, data: JobData, stages: dict[str, dict[str, Any]]
) -> tuple[Path, dict[str, Any], str | None]:
    """Save the adapter, its GGUF, loss plot and meta.json into a staged folder and publish it; the export's error."""
    from trainer.adapter_folder import StagedAdapter, export_gguf
    from trainer.basemodel import file_sha256
    from trainer.export_gguf import BaseInfo
    from trainer.plot import loss_png

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
            stages["sft"].get("losses", []),
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
    return path, meta, export_error


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
    from trainer.meter import peak_rss_mb

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


def base_gguf_for(cfg: TrainConfig) -> Path | None:
    """The GGUF llama.cpp serves this adapter on (to validate the export), if one is known."""
    if cfg.base_gguf:
        return Path(cfg.base_gguf)
    if cfg.base_model.endswith(".gguf"):
        return Path(cfg.base_model)
    return None


def stop_check(cancel: threading.Event | None, where: str) -> Callable[[], None]:
    """A check that raises `JobCancelled` ("stopped <where>") once `cancel` is set; the evaluation calls it often."""

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise JobCancelled(f"stopped {where}")

    return check


def simulate_eval_failure(kind: str) -> None:
    """Testing hook: fail evaluation the way a bug ('error') or the OOM killer ('kill') would."""
    if kind == "error":
        raise EvaluationError("simulated evaluation failure")
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def update_meta(folder: Path, **fields: Any) -> dict[str, Any]:
    """Rewrite fields of an adapter folder's meta.json atomically (a reader sees the old or the new file)."""
    meta: dict[str, Any] = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta.update(fields)
    tmp = folder / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "meta.json")
    return meta


def _chat_format_record(cfg: TrainConfig) -> dict[str, str] | None:
    try:
        return dict(ChatFormat.for_config(cfg.to_dict()).to_dict())
    except Exception:
        return None
