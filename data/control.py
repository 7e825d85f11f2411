"""Control-plane rows: training jobs, adapters and their lineage (plain dicts keyed by column name)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data.database import Database


class _Rows:
    """Shared CRUD over one table whose primary key is a text `id`."""

    table = ""

    def __init__(self, store: Database) -> None:
        self._s = store
        self._columns: tuple[str, ...] | None = None

    async def columns(self) -> tuple[str, ...]:
        """Column names of the table (read once)."""
        if self._columns is None:
            rows = await self._s.fetchall(f"PRAGMA table_info({self.table})")
            self._columns = tuple(r[1] for r in rows)
        return self._columns

    async def _check(self, fields: Iterable[str]) -> None:
        unknown = set(fields) - set(await self.columns())
        if unknown:
            raise ValueError(f"unknown {self.table} column(s): {', '.join(sorted(unknown))}")

    async def _insert(self, db: Any, fields: dict[str, Any]) -> None:
        await self._check(fields)
        names = list(fields)
        await db.execute(
            f"INSERT INTO {self.table}({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [fields[n] for n in names],
        )

    async def get(self, row_id: str) -> dict[str, Any] | None:
        """One row as a dict, or None."""
        cols = await self.columns()
        row = await self._s.fetchone(f"SELECT {', '.join(cols)} FROM {self.table} WHERE id = ?", (row_id,))
        return None if row is None else dict(zip(cols, row, strict=True))

    async def update(self, row_id: str, **fields: Any) -> bool:
        """Set some columns of one row; False when the row does not exist."""
        if not fields:
            return await self.get(row_id) is not None
        await self._check(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        async with self._s.write() as db:
            cur = await db.execute(f"UPDATE {self.table} SET {sets} WHERE id = ?", [*fields.values(), row_id])
            return cur.rowcount > 0

    async def list(
        self, member_id: str | None = None, status: str | Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rows filtered by member and status (one or several), oldest first."""
        cols = await self.columns()
        where, params = [], []
        if member_id is not None:
            where.append("member_id = ?")
            params.append(member_id)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._s.fetchall(
            f"SELECT {', '.join(cols)} FROM {self.table}{clause} ORDER BY created_at, id", params
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]

    async def delete(self, row_id: str) -> bool:
        """Delete one row."""
        async with self._s.write() as db:
            cur = await db.execute(f"DELETE FROM {self.table} WHERE id = ?", (row_id,))
            return cur.rowcount > 0


class JobRepo(_Rows):
    """Training jobs (columns per docs/contracts.md)."""

    table = "jobs"

    async def insert(self, **fields: Any) -> dict[str, Any]:
        """Create a job (id and created_at filled in when absent); returns the stored row."""
        fields.setdefault("id", uuid.uuid4().hex)
        fields.setdefault("created_at", time.time())
        async with self._s.write() as db:
            await self._insert(db, fields)
        row = await self.get(fields["id"])
        assert row is not None
        return row


class AdapterRepo(_Rows):
    """Adapters and their lineage (the member ids whose messages appear in the adapter's training examples)."""

    table = "adapters"

    async def insert(self, lineage: Iterable[str] = (), **fields: Any) -> dict[str, Any]:
        """Register an adapter with its lineage (its own member is always part of it); returns the row."""
        fields.setdefault("id", uuid.uuid4().hex)
        fields.setdefault("created_at", time.time())
        members = set(lineage)
        if fields.get("member_id"):
            members.add(fields["member_id"])
        async with self._s.write() as db:
            if "version" not in fields:
                row = await self._s.fetchone(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE member_id IS ?",
                    (fields.get("member_id"),),
                )
                fields["version"] = int(row[0])
            await self._insert(db, fields)
            await db.executemany(
                "INSERT OR IGNORE INTO adapter_lineage(adapter_id, member_id) VALUES (?, ?)",
                [(fields["id"], m) for m in sorted(members)],
            )
        row = await self.get(fields["id"])
        assert row is not None
        return row

    async def next_version(self, member_id: str | None) -> int:
        """The version number the member's next adapter gets."""
        row = await self._s.fetchone(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE member_id IS ?", (member_id,)
        )
        return int(row[0])

    async def lineage(self, adapter_id: str) -> list[str]:
        """Member ids in an adapter's lineage."""
        rows = await self._s.fetchall(
            "SELECT member_id FROM adapter_lineage WHERE adapter_id = ? ORDER BY member_id", (adapter_id,)
        )
        return [r[0] for r in rows]

    async def touching(self, member_id: str) -> list[dict[str, Any]]:
        """Adapters of the member or whose lineage includes the member (any status)."""
        cols = await self.columns()
        rows = await self._s.fetchall(
            f"SELECT {', '.join(cols)} FROM adapters WHERE member_id = ? OR id IN "
            "(SELECT adapter_id FROM adapter_lineage WHERE member_id = ?) ORDER BY created_at, id",
            (member_id, member_id),
        )
        return [dict(zip(cols, r, strict=True)) for r in rows]
