"""Personas joining conversations: the admins' per-channel switch (`join_channels`) and members' silences."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data.database import Database

# A silence with this channel id covers every channel.
EVERYWHERE = "*"


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
        return {
            "silences": [{"channel_id": r[0], "created_at": r[1]} for r in silences],
            "channels_opened": [{"channel_id": r[0], "level": r[1], "set_at": r[2]} for r in opened],
        }

    async def delete_member(self, member_id: str) -> int:
        """Delete the member's silences (their persona is gone or erased with them)."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM join_silences WHERE member_id = ?", (member_id,))
            return cur.rowcount

    async def forget_member(self, member_id: str) -> int:
        """Remove the member's id from the channels they opened (the switch itself stays as set)."""
        async with self._s.write() as db:
            cur = await db.execute("UPDATE join_channels SET set_by = NULL WHERE set_by = ?", (member_id,))
            return cur.rowcount
