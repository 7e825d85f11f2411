"""Training jobs: their lifecycle states, the row as a dataclass, and `JobTable`, the one owner of the `jobs` table."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobspec.progress import ProgressState

if TYPE_CHECKING:
    from data.database import Database


class JobStatus(StrEnum):
    """Where a job is in its life; the last four are final except `interrupted`, which can be resumed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        """True when nothing will happen to the job any more without a person asking."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def remove_job_dir(job_dir: str | Path) -> None:
    """Delete a job's folder (the member's plaintext dataset, checkpoints); nothing when the job has none."""
    if job_dir:
        shutil.rmtree(job_dir, ignore_errors=True)


# A member holds at most one of these at a time; `interrupted` counts because resuming it is the way forward.
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.INTERRUPTED.value)

COLUMNS = (
    "id",
    "member_id",
    "requested_by",
    "source",
    "mode",
    "status",
    "device",
    "job_dir",
    "config_json",
    "progress_json",
    "error",
    "exit_detail",
    "pid",
    "created_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "adapter_id",
    "supervisor_pid",
    "executor",
    "executor_ref",
    "cancel_requested_by",
    "resume",
    "progress_channel_id",
    "progress_message_id",
)


def new_job_id() -> str:
    """Sortable, short, unique: creation second + random suffix."""
    return f"j{int(time.time()):x}{uuid.uuid4().hex[:6]}"


@dataclass
class Job:
    """One row of `jobs`, with config and progress decoded."""

    id: str
    member_id: str | None
    requested_by: str
    source: str
    mode: str = "sft"
    status: JobStatus = JobStatus.QUEUED
    device: str = "cpu"
    job_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    progress: ProgressState = field(default_factory=ProgressState)
    error: str | None = None
    exit_detail: str | None = None
    pid: int | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    adapter_id: str | None = None
    supervisor_pid: int | None = None
    executor: str | None = None
    executor_ref: str | None = None
    cancel_requested_by: str | None = None
    resume: bool = False
    progress_channel_id: str | None = None  # where the bot posts the job's progress (ids only)
    progress_message_id: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able view for `--json`, the bot and logs (no config noise)."""
        return {
            "id": self.id,
            "member_id": self.member_id,
            "status": self.status.value,
            "requested_by": self.requested_by,
            "source": self.source,
            "mode": self.mode,
            "device": self.device,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "step": self.progress.step,
            "total": self.progress.total,
            "loss": self.progress.loss,
            "error": self.error,
            "exit_detail": self.exit_detail,
            "adapter_id": self.adapter_id,
        }

    @classmethod
    def from_row(cls, row: Any) -> Job:
        """Decode a `jobs` row (sqlite3.Row or a mapping)."""
        data = {k: row[k] for k in row.keys()} if hasattr(row, "keys") else dict(row)
        return cls(
            id=data["id"],
            member_id=data.get("member_id"),
            requested_by=data.get("requested_by") or "",
            source=data.get("source") or "cli",
            mode=data.get("mode") or "sft",
            status=JobStatus(data.get("status") or "queued"),
            device=data.get("device") or "cpu",
            job_dir=data.get("job_dir") or "",
            config=json.loads(data.get("config_json") or "{}"),
            progress=ProgressState.from_dict(json.loads(data.get("progress_json") or "{}")),
            error=data.get("error"),
            exit_detail=data.get("exit_detail"),
            pid=data.get("pid"),
            created_at=data.get("created_at") or 0.0,
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            heartbeat_at=data.get("heartbeat_at"),
            adapter_id=data.get("adapter_id"),
            supervisor_pid=data.get("supervisor_pid"),
            executor=data.get("executor"),
            executor_ref=data.get("executor_ref"),
            cancel_requested_by=data.get("cancel_requested_by"),
            resume=bool(data.get("resume")),
            progress_channel_id=data.get("progress_channel_id"),
            progress_message_id=data.get("progress_message_id"),
        )


class JobTable:
    """The one reader and writer of `jobs` (supervisor, bot, CLI, erasure); every state change is a compare-and-set."""

    def __init__(self, store: Database) -> None:
        self.store = store

    async def _write(self, sql: str, params: Any) -> int:
        # Through the store's write lock: a statement issued while another task holds a transaction open on the
        # shared connection would otherwise join (and roll back with) that transaction.
        async with self.store.write() as db:
            cur = await db.execute(sql, params)
            return int(cur.rowcount)

    async def _one(self, sql: str, params: tuple[Any, ...]) -> Job | None:
        async with self.store.db.execute(sql, params) as cur:
            row = await cur.fetchone()
            names = [d[0] for d in cur.description]
        return Job.from_row(dict(zip(names, row, strict=True))) if row else None

    async def _many(self, sql: str, params: tuple[Any, ...]) -> list[Job]:
        async with self.store.db.execute(sql, params) as cur:
            rows = await cur.fetchall()
            names = [d[0] for d in cur.description]
        return [Job.from_row(dict(zip(names, r, strict=True))) for r in rows]

    async def insert_if_idle(self, job: Job) -> bool:
        """Insert a queued job unless its member already has an active one (atomic); False on conflict."""
        rows = await self._write(
            """INSERT INTO jobs (id, member_id, requested_by, source, mode, status, device, job_dir, config_json,
                   progress_json, created_at, supervisor_pid, executor, resume)
               SELECT ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, 0
               WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE member_id IS ? AND status IN (?, ?, ?))""",
            (
                job.id,
                job.member_id,
                job.requested_by,
                job.source,
                job.mode,
                job.device,
                job.job_dir,
                json.dumps(job.config),
                json.dumps(job.progress.to_dict()),
                job.created_at,
                job.supervisor_pid,
                job.executor,
                job.member_id,
                *ACTIVE,
            ),
        )
        return bool(rows)

    async def get(self, job_id: str) -> Job | None:
        """One job by id."""
        return await self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def active_for_member(self, member_id: str | None) -> Job | None:
        """The member's queued, running or interrupted job, if any."""
        return await self._one(
            "SELECT * FROM jobs WHERE member_id IS ? AND status IN (?, ?, ?) ORDER BY created_at DESC LIMIT 1",
            (member_id, *ACTIVE),
        )

    async def recent(
        self, status: str | None = None, member_id: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Newest first, optionally filtered."""
        sql, params = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if status:
            sql, params = sql + " AND status = ?", [*params, status]
        if member_id:
            sql, params = sql + " AND member_id = ?", [*params, member_id]
        return await self._many(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit))

    async def with_status(self, *statuses: str) -> list[Job]:
        """Oldest first: the order the queue serves them in."""
        marks = ", ".join("?" for _ in statuses)
        return await self._many(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at, id", statuses
        )

    async def active(self, member_id: str | None = None) -> list[Job]:
        """Queued, running and interrupted jobs (of one member when given), oldest first."""
        if member_id is None:
            return await self.with_status(*ACTIVE)
        return await self._many(
            "SELECT * FROM jobs WHERE member_id = ? AND status IN (?, ?, ?) ORDER BY created_at, id",
            (member_id, *ACTIVE),
        )

    async def everything(self) -> list[Job]:
        """Every job, oldest first (erasure looks through other members' job folders too)."""
        return await self._many("SELECT * FROM jobs ORDER BY created_at, id", ())

    async def of_member(self, member_id: str) -> list[Job]:
        """Every job of the member, oldest first (their data export)."""
        return await self._many(
            "SELECT * FROM jobs WHERE member_id = ? ORDER BY created_at, id", (member_id,)
        )

    async def with_progress_message(self) -> list[tuple[Job, int, int]]:
        """Active jobs that have a progress message in Discord: (job, channel id, message id)."""
        jobs = await self._many(
            "SELECT * FROM jobs WHERE status IN (?, ?, ?) AND progress_channel_id IS NOT NULL "
            "AND progress_message_id IS NOT NULL ORDER BY created_at, id",
            ACTIVE,
        )
        return [(j, int(j.progress_channel_id or 0), int(j.progress_message_id or 0)) for j in jobs]

    async def delete(self, job_id: str) -> bool:
        """Drop a job's row (erasure of its member); True if there was one."""
        return bool(await self._write("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def update(self, job_id: str, **values: Any) -> None:
        """Set columns unconditionally (progress, heartbeat, pid)."""
        await self._set(job_id, values, None)

    async def transition(
        self, job_id: str, expected: tuple[JobStatus, ...], new: JobStatus, **values: Any
    ) -> bool:
        """Move to `new` only from one of `expected` (another process may have got there first); True if moved."""
        return await self._set(job_id, {"status": new.value, **values}, expected)

    async def claim_slot(self, job_id: str, device: str, slots: int, supervisor_pid: int, now: float) -> bool:
        """queued -> running when `device` has a free slot and no older queued job waits for it (atomic)."""
        rows = await self._write(
            """UPDATE jobs SET status = 'running', started_at = ?, heartbeat_at = ?, supervisor_pid = ?
               WHERE id = ? AND status = 'queued'
                 AND (SELECT count(*) FROM jobs WHERE device = ? AND status = 'running') < ?
                 AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.device = ? AND o.status = 'queued'
                                  AND (o.created_at < jobs.created_at
                                       OR (o.created_at = jobs.created_at AND o.id < jobs.id)))""",
            (now, now, supervisor_pid, job_id, device, slots, device),
        )
        return bool(rows)

    async def _set(self, job_id: str, values: dict[str, Any], expected: tuple[JobStatus, ...] | None) -> bool:
        values = {k: _encode(k, v) for k, v in values.items()}
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown jobs column(s): {sorted(unknown)}")
        sql = "UPDATE jobs SET " + ", ".join(f"{k} = ?" for k in values) + " WHERE id = ?"
        params: list[Any] = [*values.values(), job_id]
        if expected is not None:
            sql += " AND status IN (" + ", ".join("?" for _ in expected) + ")"
            params += [s.value for s in expected]
        rows = await self._write(sql, params)
        return bool(rows)


def _encode(key: str, value: Any) -> Any:
    if key == "progress":
        raise ValueError("use progress_json")
    if isinstance(value, ProgressState):
        return json.dumps(value.to_dict())
    if isinstance(value, JobStatus):
        return value.value
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
