"""Personas joining conversations: the admins' per-channel switch (`join_channels`), members' silences, and the
rules' durable state: budget spends (`join_spends`) and who last wrote where (`join_seen`, a time, no text)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data.database import Database

# A silence with this channel id covers every channel.
EVERYWHERE = "*"
HOUR_S = 3600.0


class JoinRepo:
    """`join_channels` (channel -> chattiness level, who set it) and `join_silences` (member, channel or '*')."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def level(self, channel_id: str) -> str | None:
        """The channel's chattiness level, or None when personas may not join in there."""
        row = await self._s.fetchone("SELECT level FROM join_channels WHERE channel_id = ?", (channel_id,))
        return str(row[0]) if row else None

    async def set_level(self, guild_id: str, channel_id: str, level: str | None, set_by: str) -> None:
        """Open a channel at `level`, or close it (None)."""
        async with self._s.write() as db:
            if level is None:
                await db.execute("DELETE FROM join_channels WHERE channel_id = ?", (channel_id,))
                return
            await db.execute(
                "INSERT INTO join_channels(channel_id, guild_id, level, set_by, set_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(channel_id) DO UPDATE SET level = excluded.level, set_by = excluded.set_by, "
                "set_at = excluded.set_at",
                (channel_id, guild_id, level, set_by, time.time()),
            )

    async def channels(self, guild_id: str) -> dict[str, str]:
        """Open channels of a server and their levels."""
        rows = await self._s.fetchall(
            "SELECT channel_id, level FROM join_channels WHERE guild_id = ? ORDER BY channel_id", (guild_id,)
        )
        return {str(r[0]): str(r[1]) for r in rows}

    async def silence(self, member_id: str, channel_id: str, on: bool) -> None:
        """Silence (or unsilence) a member's persona in a channel, or everywhere with EVERYWHERE."""
        async with self._s.write() as db:
            if on:
                await db.execute(
                    "INSERT OR IGNORE INTO join_silences(member_id, channel_id, created_at) VALUES (?, ?, ?)",
                    (member_id, channel_id, time.time()),
                )
            else:
                await db.execute(
                    "DELETE FROM join_silences WHERE member_id = ? AND channel_id = ?",
                    (member_id, channel_id),
                )

    async def silenced(self, member_ids: list[str], channel_id: str) -> set[str]:
        """Which of `member_ids` silenced their persona in this channel or everywhere (one query)."""
        if not member_ids:
            return set()
        marks = ",".join("?" * len(member_ids))
        rows = await self._s.fetchall(
            f"SELECT DISTINCT member_id FROM join_silences WHERE member_id IN ({marks}) AND channel_id IN (?, ?)",
            (*member_ids, channel_id, EVERYWHERE),
        )
        return {str(r[0]) for r in rows}

    async def for_member(self, member_id: str) -> dict[str, Any]:
        """What is stored of the member here (for their data export)."""
        silences = await self._s.fetchall(
            "SELECT channel_id, created_at FROM join_silences WHERE member_id = ? ORDER BY channel_id",
            (member_id,),
        )
        opened = await self._s.fetchall(
            "SELECT channel_id, level, set_at FROM join_channels WHERE set_by = ? ORDER BY channel_id",
            (member_id,),
        )
        seen = await self._s.fetchall(
            "SELECT channel_id, at FROM join_seen WHERE member_id = ? ORDER BY channel_id", (member_id,)
        )
        spends = await self._s.fetchall(
            "SELECT kind, channel_id, at FROM join_spends WHERE member_id = ? ORDER BY at", (member_id,)
        )
        return {
            "silences": [{"channel_id": r[0], "created_at": r[1]} for r in silences],
            "channels_opened": [{"channel_id": r[0], "level": r[1], "set_at": r[2]} for r in opened],
            "last_wrote": [{"channel_id": r[0], "at": r[1]} for r in seen],
            "budget_spends": [{"kind": r[0], "channel_id": r[1], "at": r[2]} for r in spends],
        }

    async def delete_member(self, member_id: str) -> int:
        """Delete the member's silences (their persona is gone or erased with them)."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM join_silences WHERE member_id = ?", (member_id,))
            return cur.rowcount

    # -- durable rules ----------------------------------------------------------------------------------------
    async def note_seen(self, channel_id: str, member_id: str, at: float) -> None:
        """A human wrote in a channel at `at` (only the latest time is kept)."""
        async with self._s.write() as db:
            await db.execute(
                "INSERT INTO join_seen(channel_id, member_id, at) VALUES (?, ?, ?) "
                "ON CONFLICT(channel_id, member_id) DO UPDATE SET at = MAX(at, excluded.at)",
                (channel_id, member_id, at),
            )

    async def seen(self, channel_id: str, since: float) -> dict[str, float]:
        """Who wrote in the channel since `since`, and when they last did."""
        rows = await self._s.fetchall(
            "SELECT member_id, at FROM join_seen WHERE channel_id = ? AND at >= ?", (channel_id, since)
        )
        return {str(r[0]): float(r[1]) for r in rows}

    async def last_seen(self, channel_id: str, member_id: str) -> float | None:
        """When the member last wrote in the channel, if ever (as far as the bot saw)."""
        row = await self._s.fetchone(
            "SELECT at FROM join_seen WHERE channel_id = ? AND member_id = ?", (channel_id, member_id)
        )
        return float(row[0]) if row else None

    async def spent(self, kind: str, member_ids: list[str], now: float) -> dict[str, int]:
        """How many `kind` spends each member has in the last hour (one query)."""
        if not member_ids:
            return {}
        marks = ",".join("?" * len(member_ids))
        rows = await self._s.fetchall(
            f"SELECT member_id, COUNT(*) FROM join_spends WHERE kind = ? AND at > ? AND member_id IN ({marks}) "
            "GROUP BY member_id",
            (kind, now - HOUR_S, *member_ids),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def spend(
        self,
        kind: str,
        channel_id: str,
        member_id: str,
        now: float,
        *,
        channel_per_hour: int,
        member_per_hour: int,
        cooldown_s: float = 0.0,
    ) -> int | None:
        """Spend one `kind` turn if the channel's and the member's hourly budgets and the channel's cooldown allow
        it, checked and spent in one write transaction (two decisions at once cannot both take the last one);
        returns the spend's id (for `refund`), or None when refused."""
        async with self._s.write() as db:
            await db.execute("DELETE FROM join_spends WHERE at <= ?", (now - HOUR_S,))
            cur = await db.execute(
                "SELECT COUNT(*), MAX(at) FROM join_spends WHERE kind = ? AND channel_id = ? AND at > ?",
                (kind, channel_id, now - HOUR_S),
            )
            in_channel, latest = await cur.fetchone() or (0, None)
            cur = await db.execute(
                "SELECT COUNT(*) FROM join_spends WHERE kind = ? AND member_id = ? AND at > ?",
                (kind, member_id, now - HOUR_S),
            )
            (of_member,) = await cur.fetchone() or (0,)
            if in_channel >= channel_per_hour or of_member >= member_per_hour:
                return None
            if latest is not None and now - float(latest) < cooldown_s:
                return None
            cur = await db.execute(
                "INSERT INTO join_spends(kind, channel_id, member_id, at) VALUES (?, ?, ?, ?)",
                (kind, channel_id, member_id, now),
            )
            return cur.lastrowid

    async def refund(self, spend_id: int) -> None:
        """Give a spend back (nothing was sent)."""
        async with self._s.write() as db:
            await db.execute("DELETE FROM join_spends WHERE id = ?", (spend_id,))

    async def delete_state(self, member_id: str) -> dict[str, int]:
        """Delete the member's spends and when they wrote where."""
        async with self._s.write() as db:
            spends = await db.execute("DELETE FROM join_spends WHERE member_id = ?", (member_id,))
            seen = await db.execute("DELETE FROM join_seen WHERE member_id = ?", (member_id,))
            return {"join_spends": spends.rowcount, "join_seen": seen.rowcount}

    async def forget_member(self, member_id: str) -> int:
        """Remove the member's id from the channels they opened (the switch itself stays as set)."""
        async with self._s.write() as db:
            cur = await db.execute("UPDATE join_channels SET set_by = NULL WHERE set_by = ?", (member_id,))
            return cur.rowcount
