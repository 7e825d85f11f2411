"""`doppel train USER_ID`: a training job through the same supervisor the bot uses, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import signal
import sys
import time
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


class TrainingFailed(UserFacingError):
    """The job ended without an adapter (failed, cancelled or interrupted)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a member's persona adapter (progress bar; prints the adapter id)")
    p.add_argument("user_id", nargs="?", help="Discord id of the member to train")
    p.add_argument("--base", help="registered base model name (see `doppel personas bases`)")
    from jobspec.config import PRESET_TIMES, TrainConfig

    p.add_argument(
        "--preset",
        choices=TrainConfig.choices("preset"),
        help="recipe by the time you will spend: " + "; ".join(f"{k}: {v}" for k, v in PRESET_TIMES.items()),
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="optimizer steps (default: derived from the member's data by the preset)",
    )
    p.add_argument("--epochs", type=float, help="epochs, used when --max-steps is 0")
    p.add_argument(
        "--mode", choices=TrainConfig.choices("mode"), default="sft", help=TrainConfig.help_of("mode")
    )
    p.add_argument("--device", help="cpu or cuda:N (default: the least busy device)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training config field, e.g. --set micro_batch_size=2 (JSON values)",
    )
    p.add_argument(
        "--resume", action="store_true", help="resume the member's interrupted job from its checkpoint"
    )
    p.add_argument("--cancel", metavar="JOB_OR_USER", help="cancel a job (by job id or member id)")
    p.add_argument("--jobs", action="store_true", help="list recent jobs instead of training")
    p.add_argument(
        "--job", metavar="JOB_ID", help="show one job: how it ended, in words, and its kept stderr tail"
    )
    p.add_argument(
        "--detach", action="store_true", help="queue the job and return (the bot's supervisor runs it)"
    )
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserFacingError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    if getattr(args, "preset", None):
        out["preset"] = args.preset
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise UserFacingError("--max-steps must be 0 or more")
        out["max_steps"] = args.max_steps
    if args.epochs is not None:
        if args.epochs <= 0:
            raise UserFacingError("--epochs must be positive")
        out["epochs"] = args.epochs
        out.setdefault("max_steps", 0 if args.max_steps is None else args.max_steps)
    return out


def run(args: argparse.Namespace, settings: Settings) -> Any:
    if not (args.jobs or args.cancel or args.job) and not args.user_id:
        raise UserFacingError("train: name the member to train (USER_ID), or use --jobs / --job / --cancel")
    if args.user_id is not None and not args.user_id.strip().isdigit():
        raise UserFacingError(f"train: {args.user_id!r} is not a Discord user id")
    # SIGTERM (systemd, Docker, `kill`) takes the same path as Ctrl-C: the command's task is cancelled, the
    # supervisor asks the trainer to checkpoint and stop, and the job is left `interrupted`, resumable with --resume.
    # The handler cancels the task itself rather than re-raising SIGINT: a background job of a non-interactive shell
    # (`doppel train ... &` in a script, some service managers) inherits SIGINT as ignored, and then nothing happens.
    try:
        return asyncio.run(_run_stoppable(args, settings))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


async def _run_stoppable(args: argparse.Namespace, settings: Settings) -> Any:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop() -> None:
        # Once: a second SIGTERM takes the default action (the trainer child then stops itself, see lifeline).
        loop.remove_signal_handler(signal.SIGTERM)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await _run(args, settings)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run(args: argparse.Namespace, settings: Settings) -> Any:
    from data.store import Store
    from jobs.supervisor import Supervisor

    actor = f"cli:{getpass.getuser()}"
    async with Store.open(settings) as store:
        sup = Supervisor(store, settings)
        await sup.start()
        try:
            if args.jobs:
                return _print_jobs(await sup.jobs.recent(member_id=args.user_id, limit=30), args.json)
            if args.job:
                return _print_job(await sup.get(args.job), args.json)
            if args.cancel:
                job = (
                    await sup.get(args.cancel)
                    if not args.cancel.isdigit()
                    else await _member_job(sup, args.cancel)
                )
                done = await sup.cancel(job.id, actor)
                if not args.json:
                    print(f"job {done.id}: {done.status.value}")
                return done.summary()
            if args.resume:
                job = await _member_job(sup, args.user_id)
                job = await sup.resume(job.id)
            else:
                job = await sup.submit(
                    args.user_id,
                    requested_by=actor,
                    source="cli",
                    mode=args.mode,
                    base=args.base,
                    device=args.device,
                    **_overrides(args),
                )
            if not args.json:
                print(f"job {job.id} queued on {job.device} for member {job.member_id}", file=sys.stderr)
            if args.detach:
                return job.summary()
            return await _follow(sup, job.id, args.json)
        finally:
            await sup.close()


async def _member_job(sup: Any, member_id: str) -> Any:
    job = await sup.jobs.active_for_member(member_id)
    if job is None:
        raise UserFacingError(f"member {member_id} has no queued, running or interrupted job")
    return job


async def _follow(sup: Any, job_id: str, as_json: bool) -> dict[str, Any]:
    from jobspec.progress import Throttle, render_bar

    tty = sys.stderr.isatty()
    throttle = Throttle(0.2 if tty else 5.0)

    def show(job: Any) -> None:
        line = render_bar(job.progress, fill="#", empty="-")
        # ETA ticks change the line every second: a log gets a line when the step, loss or status moved.
        key = line if tty else render_bar(_without_eta(job.progress), fill="#", empty="-")
        if not throttle.ready(job.progress, text=key):
            return
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        job = await sup.wait(job_id, on_update=show)
    except asyncio.CancelledError:  # Ctrl-C: close() checkpoints the trainer and marks the job interrupted
        print(f"\njob {job_id} interrupted; continue with `doppel train <USER_ID> --resume`", file=sys.stderr)
        raise
    if tty:
        print(file=sys.stderr)
    if job.status.value != "succeeded":
        raise TrainingFailed(f"job {job.id} {job.status.value}: {job.error or job.exit_detail}")
    adapter = await sup.registry.get(job.adapter_id)
    reason = adapter.meta.get("gate", {}).get("reason", "")
    if not as_json:
        print(
            f"adapter {adapter.id} (member {adapter.member_id}, version {adapter.version}, {adapter.status}: {reason})"
        )
    return {
        "job": job.summary(),
        "adapter_id": adapter.id,
        "version": adapter.version,
        "status": adapter.status,
        "gate_reason": reason,
        "elapsed_s": round(time.time() - (job.started_at or job.created_at), 1),
    }


def _without_eta(state: Any) -> Any:
    from dataclasses import replace

    return replace(state, eta_s=None, tokens_per_s=None)


def _print_jobs(jobs: list[Any], as_json: bool) -> dict[str, Any]:
    rows = [j.summary() for j in jobs]
    if not as_json:
        if not rows:
            print("no jobs")
        for r in rows:
            step = f"{r['step']}/{r['total']}" if r["total"] else "-"
            print(
                f"{r['id']}  {r['member_id'] or '(multi)':<20} {r['status']:<11} {r['device']:<7} step {step:<9} "
                f"by {r['requested_by']}  {r['error'] or ''}"
            )
    return {"jobs": rows}


def _print_job(job: Any, as_json: bool) -> dict[str, Any]:
    """One job in full: status, the reason in words, and the exit detail with the kept stderr tail."""
    row = job.summary()
    if not as_json:
        step = f"{row['step']}/{row['total']}" if row["total"] else "-"
        print(
            f"job {row['id']}  member {row['member_id'] or '(multi)'}  {row['status']}  step {step}  on {row['device']}"
        )
        if row["error"]:
            print(f"why: {row['error']}")
        if row["adapter_id"]:
            print(f"adapter: {row['adapter_id']}")
        if row["exit_detail"]:
            print("how the trainer ended (stderr tail; the job folder and its data are deleted):")
            print(row["exit_detail"])
    return row
