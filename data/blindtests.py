"""Blind tests of personas: which real message was shown (by id only) against a generated one, and the votes."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data.database import Database

LABELS = ("A", "B")


class BlindTestRepo:
    """`blind_tests` and `blind_votes`: no text is stored; the real message is referenced by id, the generated one not kept."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def create(
        self,
        member_id: str,
        real_message_id: str,
        real_label: str,
        *,
        adapter_id: str | None = None,
        guild_id: str | None = None,
        channel_id: str | None = None,
    ) -> str:
        """Record a new test; returns its id."""
        if real_label not in LABELS:
            raise ValueError("real_label must be 'A' or 'B'")
        test_id = uuid.uuid4().hex
        async with self._s.write() as db:
            await db.execute(
                "INSERT INTO blind_tests(id, member_id, adapter_id, guild_id, channel_id, real_message_id, real_label, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    test_id,
                    member_id,
                    adapter_id,
                    guild_id,
                    channel_id,
                    real_message_id,
                    real_label,
                    time.time(),
                ),
            )
        return test_id

    async def get(self, test_id: str) -> dict[str, Any] | None:
        """A test by id, or None (erased tests are gone)."""
        row = await self._s.fetchone(
            "SELECT id, member_id, adapter_id, guild_id, channel_id, real_message_id, real_label, created_at "
            "FROM blind_tests WHERE id = ?",
            (test_id,),
        )
        keys = (
            "id",
            "member_id",
            "adapter_id",
            "guild_id",
            "channel_id",
            "real_message_id",
            "real_label",
            "created_at",
        )
        return None if row is None else dict(zip(keys, row, strict=True))

    async def vote(self, test_id: str, voter_id: str, picked: str) -> bool | None:
        """Record `voter_id` picking label `picked` as the real one; None if they already voted, else whether right."""
        if picked not in LABELS:
            raise ValueError("picked must be 'A' or 'B'")
        async with self._s.write() as db:
            async with db.execute("SELECT real_label FROM blind_tests WHERE id = ?", (test_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise KeyError(test_id)
            right = picked == row[0]
            cur2 = await db.execute(
                "INSERT OR IGNORE INTO blind_votes(test_id, voter_id, picked_real, created_at) VALUES (?, ?, ?, ?)",
                (test_id, voter_id, int(right), time.time()),
            )
            return right if cur2.rowcount else None

    async def votes(self, test_id: str) -> list[dict[str, Any]]:
        """The votes on one test, oldest first."""
        rows = await self._s.fetchall(
            "SELECT voter_id, picked_real, created_at FROM blind_votes WHERE test_id = ? ORDER BY created_at, voter_id",
            (test_id,),
        )
        return [{"voter_id": r[0], "picked_real": bool(r[1]), "created_at": r[2]} for r in rows]

    async def results(self, member_id: str, adapter_id: str | None = None) -> dict[str, Any]:
        """Totals for a persona (optionally one adapter version): tests, votes, how many picked the real message."""
        where, params = "t.member_id = ?", [member_id]
        if adapter_id is not None:
            where += " AND t.adapter_id = ?"
            params.append(adapter_id)
        row = await self._s.fetchone(
            f"SELECT COUNT(DISTINCT t.id), COUNT(v.voter_id), COALESCE(SUM(v.picked_real), 0) "
            f"FROM blind_tests t LEFT JOIN blind_votes v ON v.test_id = t.id WHERE {where}",
            params,
        )
        tests, votes, correct = (int(x or 0) for x in row)
        return {
            "tests": tests,
            "votes": votes,
            "identified_real": correct,
            "identified_share": (correct / votes) if votes else None,
        }

    async def given_by(self, voter_id: str) -> list[dict[str, Any]]:
        """Votes a member cast (test id, persona, right or not)."""
        rows = await self._s.fetchall(
            "SELECT v.test_id, t.member_id, v.picked_real, v.created_at FROM blind_votes v "
            "JOIN blind_tests t ON t.id = v.test_id WHERE v.voter_id = ? ORDER BY v.created_at",
            (voter_id,),
        )
        return [
            {"test_id": r[0], "persona_member_id": r[1], "picked_real": bool(r[2]), "created_at": r[3]}
            for r in rows
        ]

    async def delete_member(self, member_id: str) -> dict[str, int]:
        """Delete the member's tests (with every vote on them) and every vote the member cast."""
        async with self._s.write() as db:
            v1 = await db.execute(
                "DELETE FROM blind_votes WHERE voter_id = ? OR test_id IN (SELECT id FROM blind_tests WHERE member_id = ?)",
                (member_id, member_id),
            )
            t = await db.execute("DELETE FROM blind_tests WHERE member_id = ?", (member_id,))
            return {"tests": t.rowcount, "votes": v1.rowcount}
