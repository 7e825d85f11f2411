"""Erasure and export of training jobs: rows of `jobs` and the job folders (their datasets hold plaintext)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consent.erasure import ErasureContext, erasure_part, export_part, meta_mentions
from jobs.executors import stop_trainer
from jobs.table import JobStatus, JobTable

if TYPE_CHECKING:
    from data.store import Store

ERASED = "cancelled: a member's data was erased"


@erasure_part("jobs", order=10, tables=("jobs",), paths=("jobs",))
async def erase_jobs(ctx: ErasureContext) -> dict[str, int]:
    """Cancel and stop jobs that involve the member, delete their folders, drop the member's own rows."""
    jobs, m = JobTable(ctx.store), ctx.member_id
    signalled = folders = rows_deleted = 0
    seen_dirs: set[Path] = set()
    for job in await jobs.everything():
        job_dir = Path(job.job_dir) if job.job_dir else None
        own = job.member_id == m
        if not (own or (job_dir is not None and meta_mentions(job_dir / "dataset" / "meta.json", m))):
            continue
        if not job.status.final:
            # Cancelled before the trainer is stopped: a supervisor that sees it end, or a publish racing it,
            # finds the job no longer running and never publishes an adapter trained on the erased member.
            await jobs.transition(
                job.id,
                (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.INTERRUPTED),
                JobStatus.CANCELLED,
                error=ERASED,
                finished_at=time.time(),
            )
            if await stop_trainer(job, ctx.settings):
                signalled += 1
            ctx.cancelled_jobs.append(job.id)
        if job_dir is not None:
            if job_dir.exists():
                ctx.remove(job_dir)
                folders += 1
            seen_dirs.add(job_dir.resolve())
        if own and await jobs.delete(job.id):
            rows_deleted += 1
    # Folders without a row (crashed supervisor, leftovers) still hold datasets.
    root = ctx.settings.jobs_dir
    if root.is_dir():
        for child in root.iterdir():
            if child.resolve() in seen_dirs or not child.is_dir():
                continue
            if m in child.name or meta_mentions(child / "dataset" / "meta.json", m):
                ctx.remove(child)
                folders += 1
    return {"signalled": signalled, "folders": folders, "rows_deleted": rows_deleted}


@export_part("jobs")
async def export_jobs(store: Store, member_id: str) -> list[dict[str, Any]]:
    """The member's jobs, with their decoded config and progress."""
    return [asdict(job) for job in await JobTable(store).of_member(member_id)]
