"""Evaluating a saved adapter again, in a trainer child: for versions whose evaluation (or export) failed.

The parent (the `doppel eval` command, or the bot) rebuilds the member's held-out replies and attribution panel
from the store into a short-lived job folder (sealed with its job key, like any job's), runs
`python -m trainer evaluate JOB_DIR --adapter PATH` with the key on stdin, and records the metrics through the
registry, which promotes a candidate that now passes the gate. A version whose GGUF export failed is converted by
the child first (into the job folder), and the parent copies the file into the adapter folder. The folder is
removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.chatformat import LEGACY_STYLE
from core.settings import Settings
from jobspec.config import TrainConfig
from jobspec.errors import EvaluationError

# Dataset files an evaluation does not read: removed before the child starts (least plaintext, even sealed).
_NOT_NEEDED = ("train.jsonl", "val.jsonl", "preference.jsonl")
# Test hooks of the original job must not fire again on the rerun.
_RESET = {
    "simulate_eval_failure": "",
    "simulate_export_failure": False,
    "simulate_oom_at_step": 0,
    "tensorboard": False,
}


def evaluation_config(adapter_id: str, meta: dict[str, Any]) -> TrainConfig:
    """The adapter's training config as recorded in its meta.json, test hooks off, for evaluating it again."""
    config = dict(meta.get("training_config") or {})
    if not config:
        raise EvaluationError(
            f"adapter {adapter_id} has no training configuration in its meta.json to evaluate with"
        )
    config.update({k: v for k, v in _RESET.items() if k in config})
    # Evaluated in the prompt shape it was trained with; adapters from before the field used the persona prompt.
    config.setdefault("prompt_style", LEGACY_STYLE)
    # An adapter trained by another release may carry fields this one does not know; evaluation needs none of them.
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in config.items() if k in known})


async def reevaluate(
    store: Any, settings: Settings, version: Any, on_event: Callable[[dict[str, Any]], Any] | None = None
) -> Any:
    """Evaluate `version` (a registry AdapterVersion) again; returns the updated version."""
    from jobs.dataset import materialize
    from jobs.supervisor import chat_format_for
    from models.registry import Registry

    cfg = evaluation_config(version.id, dict(version.meta or {}))
    config = cfg.to_dict()
    job_dir = settings.jobs_dir / f"eval-{version.member_id or 'multi'}-{uuid.uuid4().hex[:12]}"
    try:
        job_dir.mkdir(parents=True)
        cfg.to_json(job_dir / "config.json")
        chat = await asyncio.to_thread(chat_format_for, config)
        await materialize(
            store,
            settings,
            version.member_id or "",
            job_dir,
            chat,
            "sft",
            multi=version.member_id is None,
            style=cfg.prompt_style,
        )
        for name in _NOT_NEEDED:
            (job_dir / "dataset" / name).unlink(missing_ok=True)
        converted: dict[str, Any] = {}

        def seen(event: dict[str, Any]) -> Any:
            if event.get("event") == "artifact" and event.get("kind") == "gguf" and event.get("path"):
                converted.update(event)
            return on_event(event) if on_event is not None else None

        registry = Registry(store, settings)
        try:
            metrics = await _run_child(settings, job_dir, Path(version.path), seen)
        finally:
            if converted and Path(str(converted["path"])).is_file():
                # A version whose export failed after training: the child converted it; keep that even when the
                # evaluation that follows fails, so the next `doppel eval` only evaluates.
                await registry.record_export(
                    version.id, Path(str(converted["path"])), converted.get("export")
                )
        return await registry.record_evaluation(version.id, metrics)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


async def _run_child(
    settings: Settings, job_dir: Path, adapter: Path, on_event: Callable[[dict[str, Any]], Any] | None
) -> dict[str, Any]:
    from jobs.executors.base import StderrTail, parse_event
    from jobs.executors.local import STREAM_LIMIT, device_env, send_job_key

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer",
        "evaluate",
        str(job_dir),
        "--adapter",
        str(adapter),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=device_env(""),
        cwd=str(job_dir),
        limit=STREAM_LIMIT,
    )
    await send_job_key(proc, settings, job_dir)
    tail = StderrTail()

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            tail.add(line.decode("utf-8", "replace"))

    stderr_task = asyncio.create_task(drain())
    metrics: dict[str, Any] | None = None
    finished: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            event = parse_event(raw.decode("utf-8", "replace"))
            if event is None:
                continue
            if on_event is not None:
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result
            if event.get("event") == "metrics":
                metrics = {k: v for k, v in event.items() if k not in ("event", "ts")}
            elif event.get("event") == "finished":
                finished = event
        code = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stderr_task, timeout=5)
    if code == 0 and metrics is not None:
        return metrics
    if code < 0:
        why = f"killed by signal {-code}"
    else:
        lines = tail.lines()
        why = str(finished.get("error") or (lines[-1] if lines else f"exit code {code}"))
    raise EvaluationError(f"the evaluation failed again: {why}")
