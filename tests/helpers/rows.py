"""Rows that tests need in states the product reaches only after real training: jobs and adapter versions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from data.store import Store
from jobs.table import Job, JobTable, new_job_id
from models.registry import COLUMNS, AdapterVersion, Registry


async def seed_job(store: Store, member_id: str | None, status: str = "queued", **fields: Any) -> Job:
    """A job inserted through its owner (`JobTable`), then moved to `status` with `fields` set."""
    jobs = JobTable(store)
    job = Job(
        id=str(fields.pop("id", new_job_id())),
        member_id=member_id,
        requested_by="test",
        source="cli",
        job_dir=str(fields.pop("job_dir", "")),
        created_at=float(fields.pop("created_at", time.time())),
    )
    assert await jobs.insert_if_idle(job), f"member {member_id} already has an active job"
    if status != "queued" or fields:
        await jobs.update(job.id, status=status, **fields)
    found = await jobs.get(job.id)
    assert found is not None
    return found


async def seed_adapter(store: Store, lineage: Iterable[str] = (), **fields: Any) -> AdapterVersion:
    """An adapter row without training (files, if any, are the test's): the registry reads it like a published one.

    Publishing needs a trained artifact folder; tests of listing, serving and erasure need only the row, so it is
    written here directly, version 1 unless given.
    """
    row: dict[str, Any] = {
        "id": uuid.uuid4().hex[:16],
        "base_model": "smol",
        "version": 1,
        "status": "active",
        "created_at": time.time(),
        **fields,
    }
    unknown = set(row) - set(COLUMNS)
    assert not unknown, f"unknown adapters column(s): {unknown}"
    members = sorted({*lineage, *([row["member_id"]] if row.get("member_id") else [])})
    async with store.write() as db:
        await db.execute(
            f"INSERT INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            list(row.values()),
        )
        await db.executemany(
            "INSERT INTO adapter_lineage (adapter_id, member_id) VALUES (?, ?)",
            [(row["id"], m) for m in members],
        )
    return await Registry(store, store.settings).get(row["id"])
