"""Processes that serve personas (`serving_places`) and the erasure notices each acknowledges (`erasure_notices`,
`erasure_acks`): how `forget` run in one process reaches the engines and servers of the others."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data.database import Database

# A notice is kept this long for a place that was slow to read it; then it goes (it names a forgotten member).
NOTICE_KEPT_S = 3600.0


@dataclass(frozen=True)
class Place:
    """One serving process as it registered itself: what it is, in words a person reads in forget's report."""

    id: str
    kind: str
    label: str
    pid: int | None
    heartbeat_at: float


@dataclass(frozen=True)
class Notice:
    """One erasure: the member, and the adapter folders retired with them (theirs and lineage-retired ones)."""

    seq: int
    member_id: str
    adapters: tuple[str, ...]
    created_at: float


@dataclass(frozen=True)
class Ack:
    """A place's answer to a notice: whether it held anything of the member, and whether it let all of it go."""

    place_id: str
    held: bool
    released: bool
    detail: str


class ServingRepo:
    """The three tables' owner: places register and beat, forget posts notices, places acknowledge them."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def register(self, place_id: str, kind: str, label: str, pid: int | None) -> int:
        """Add (or renew) a place; returns the newest notice's seq, so it acts only on erasures after its start."""
        now = time.time()
        async with self._s.write() as db:
            await db.execute(
                "INSERT INTO serving_places(id, kind, label, pid, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET label = excluded.label, heartbeat_at = excluded.heartbeat_at",
                (place_id, kind, label, pid, now, now),
            )
            row = await (await db.execute("SELECT COALESCE(MAX(seq), 0) FROM erasure_notices")).fetchone()
        return int(row[0]) if row else 0

    async def beat(self, place_id: str) -> None:
        """The place is alive (forget waits only for places that beat recently)."""
        async with self._s.write() as db:
            await db.execute(
                "UPDATE serving_places SET heartbeat_at = ? WHERE id = ?", (time.time(), place_id)
            )

    async def unregister(self, place_id: str) -> None:
        """The place stopped: it holds nothing any more, so forget need not wait for it."""
        async with self._s.write() as db:
            await db.execute("DELETE FROM serving_places WHERE id = ?", (place_id,))

    async def registered(self) -> list[Place]:
        """Every registered place, live or not (one killed without unregistering stays until erasure names it)."""
        rows = await self._s.fetchall(
            "SELECT id, kind, label, pid, heartbeat_at FROM serving_places ORDER BY id", ()
        )
        return [Place(str(r[0]), str(r[1]), str(r[2]), r[3], float(r[4])) for r in rows]

    async def live(self, within_s: float) -> list[Place]:
        """Places that beat within the last `within_s` seconds."""
        rows = await self._s.fetchall(
            "SELECT id, kind, label, pid, heartbeat_at FROM serving_places WHERE heartbeat_at >= ? ORDER BY id",
            (time.time() - within_s,),
        )
        return [Place(str(r[0]), str(r[1]), str(r[2]), r[3], float(r[4])) for r in rows]

    async def notify(self, member_id: str, adapters: list[str]) -> int:
        """Post an erasure for every place to act on; returns its seq. Older notices are pruned here."""
        now = time.time()
        async with self._s.write() as db:
            await db.execute("DELETE FROM erasure_notices WHERE created_at < ?", (now - NOTICE_KEPT_S,))
            cur = await db.execute(
                "INSERT INTO erasure_notices(member_id, adapters_json, created_at) VALUES (?, ?, ?)",
                (member_id, json.dumps(sorted(set(adapters))), now),
            )
            seq = cur.lastrowid
        assert seq is not None  # an INSERT into a rowid table always has one
        return int(seq)

    async def after(self, seq: int) -> list[Notice]:
        """Notices newer than `seq`, oldest first."""
        rows = await self._s.fetchall(
            "SELECT seq, member_id, adapters_json, created_at FROM erasure_notices WHERE seq > ? ORDER BY seq",
            (seq,),
        )
        return [Notice(int(r[0]), str(r[1]), tuple(json.loads(r[2])), float(r[3])) for r in rows]

    async def ack(self, seq: int, place_id: str, *, held: bool, released: bool, detail: str = "") -> None:
        """Record a place's answer to notice `seq` (a notice pruned meanwhile takes no answer)."""
        async with self._s.write() as db:
            await db.execute(
                "INSERT OR REPLACE INTO erasure_acks(seq, place_id, held, released, detail, acked_at) "
                "SELECT seq, ?, ?, ?, ?, ? FROM erasure_notices WHERE seq = ?",
                (place_id, int(held), int(released), detail, time.time(), seq),
            )

    async def acks(self, seq: int) -> dict[str, Ack]:
        """The answers to notice `seq` so far, by place id."""
        rows = await self._s.fetchall(
            "SELECT place_id, held, released, detail FROM erasure_acks WHERE seq = ?", (seq,)
        )
        return {str(r[0]): Ack(str(r[0]), bool(r[1]), bool(r[2]), str(r[3])) for r in rows}

    async def delete_notice(self, seq: int) -> None:
        """Drop notice `seq` and its answers: every place acted on it, and it names a forgotten member."""
        async with self._s.write() as db:
            await db.execute("DELETE FROM erasure_acks WHERE seq = ?", (seq,))
            await db.execute("DELETE FROM erasure_notices WHERE seq = ?", (seq,))

    async def delete_member(self, member_id: str, keep: int | None = None) -> int:
        """Drop the member's notices (and their answers), except notice `keep`, which places still read."""
        async with self._s.write() as db:
            cur = await db.execute(
                "DELETE FROM erasure_notices WHERE member_id = ? AND seq IS NOT ?", (member_id, keep)
            )
            return int(cur.rowcount or 0)
