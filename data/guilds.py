"""Per-guild settings: recording switch, the admin's acknowledgement, channel allowlists."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from data.records import GuildSettings

if TYPE_CHECKING:
    from data.database import Database

FIELDS = ("recording_enabled", "acknowledged_by", "acknowledged_at", "channel_allowlist", "persona_channels")


class GuildRepo:
    """Read and change guild settings (defaults when a guild was never configured: recording off)."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def get(self, guild_id: str) -> GuildSettings:
        """Settings of a guild."""
        row = await self._s.fetchone(
            "SELECT recording_enabled, acknowledged_by, acknowledged_at, channel_allowlist_json, persona_channels_json "
            "FROM guild_settings WHERE guild_id = ?",
            (guild_id,),
        )
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(
            guild_id, bool(row[0]), row[1], row[2], tuple(json.loads(row[3])), tuple(json.loads(row[4]))
        )

    async def set(self, guild_id: str, **changes: Any) -> GuildSettings:
        """Change some fields (names as in GuildSettings) and return the new settings."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown guild setting(s): {', '.join(sorted(unknown))}")
        current = await self.get(guild_id)
        merged = {f: getattr(current, f) for f in FIELDS} | changes
        async with self._s.write() as db:
            await db.execute(
                "INSERT INTO guild_settings(guild_id, recording_enabled, acknowledged_by, acknowledged_at, "
                "channel_allowlist_json, persona_channels_json) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(guild_id) DO UPDATE SET recording_enabled = excluded.recording_enabled, "
                "acknowledged_by = excluded.acknowledged_by, acknowledged_at = excluded.acknowledged_at, "
                "channel_allowlist_json = excluded.channel_allowlist_json, "
                "persona_channels_json = excluded.persona_channels_json",
                (
                    guild_id,
                    int(bool(merged["recording_enabled"])),
                    merged["acknowledged_by"],
                    merged["acknowledged_at"],
                    json.dumps(list(merged["channel_allowlist"])),
                    json.dumps(list(merged["persona_channels"])),
                ),
            )
        return await self.get(guild_id)

    async def forget_member(self, member_id: str) -> int:
        """Remove a member's id from acknowledgements (the acknowledgement time stays)."""
        async with self._s.write() as db:
            cur = await db.execute(
                "UPDATE guild_settings SET acknowledged_by = NULL WHERE acknowledged_by = ?", (member_id,)
            )
            return cur.rowcount
