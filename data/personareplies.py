"""Persona replies the bot posted, kept so 👍/👎 and reply chains still work after a restart (text sealed)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from data.crypto import seal, unseal

if TYPE_CHECKING:
    from data.database import Database

# Feedback on a reply older than this is unlikely and its context is stale: old rows are pruned as new ones arrive.
RETENTION_S = 30 * 86400


def _ad(persona_member_id: str, message_id: str) -> bytes:
    return f"pr\x00{persona_member_id}\x00{message_id}".encode()


class PersonaReplyRepo:
    """`persona_replies`: who spoke, where, and the sealed context + reply (with the persona member's key)."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def add(
        self,
        message_id: str,
        persona_member_id: str,
        *,
        adapter_id: str | None,
        mode: str | None = None,
        guild_id: str | None,
        channel_id: str | None,
        context_members: Sequence[str],
        payload: dict[str, Any],
        now: float | None = None,
    ) -> None:
        """Remember one posted reply; `payload` (context, reply text, names) is sealed with the persona's key."""
        now = time.time() if now is None else now
        async with self._s.write() as db:
            aead = await self._s.keys.cipher(persona_member_id, create=True)
            assert aead is not None
            blob = seal(
                aead, json.dumps(payload, ensure_ascii=False).encode(), _ad(persona_member_id, message_id)
            )
            await db.execute(
                "INSERT OR REPLACE INTO persona_replies(message_id, persona_member_id, adapter_id, mode, guild_id, "
                "channel_id, context_members_json, payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message_id,
                    persona_member_id,
                    adapter_id,
                    mode,
                    guild_id,
                    channel_id,
                    json.dumps(sorted(set(context_members))),
                    blob,
                    now,
                ),
            )
            await db.execute("DELETE FROM persona_replies WHERE created_at < ?", (now - RETENTION_S,))

    async def get(self, message_id: str) -> dict[str, Any] | None:
        """A remembered reply with its payload decrypted, or None (unknown, pruned, erased or key shredded)."""
        row = await self._s.fetchone(
            "SELECT persona_member_id, adapter_id, guild_id, channel_id, context_members_json, payload, created_at, "
            "mode FROM persona_replies WHERE message_id = ?",
            (message_id,),
        )
        if row is None:
            return None
        aead = await self._s.keys.cipher(row[0])
        if aead is None or row[5] is None:
            return None
        try:
            payload = json.loads(unseal(aead, row[5], _ad(row[0], message_id)))
        except InvalidTag:
            return None
        return {
            "message_id": message_id,
            "persona_member_id": row[0],
            "adapter_id": row[1],
            "guild_id": row[2],
            "channel_id": row[3],
            "context_members": json.loads(row[4]),
            "created_at": row[6],
            "mode": row[7],
            "payload": payload,
        }

    async def modes(self, persona_member_id: str, guild_id: str | None = None) -> dict[str, int]:
        """How many kept replies each persona mode made (of one persona, in one server when given)."""
        where, args = "persona_member_id = ?", [persona_member_id]
        if guild_id is not None:
            where, args = where + " AND guild_id = ?", [*args, guild_id]
        rows = await self._s.fetchall(
            f"SELECT COALESCE(mode, 'unrecorded'), COUNT(*) FROM persona_replies WHERE {where} GROUP BY 1 "
            "ORDER BY 2 DESC",
            tuple(args),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def for_persona(self, persona_member_id: str) -> list[dict[str, Any]]:
        """Every kept reply of one persona, decrypted (for the member's data export)."""
        rows = await self._s.fetchall(
            "SELECT message_id FROM persona_replies WHERE persona_member_id = ? ORDER BY created_at",
            (persona_member_id,),
        )
        found = [await self.get(r[0]) for r in rows]
        return [r for r in found if r is not None]

    async def count(self, persona_member_id: str | None = None) -> int:
        """How many replies are remembered (of one persona)."""
        if persona_member_id is None:
            row = await self._s.fetchone("SELECT COUNT(*) FROM persona_replies")
        else:
            row = await self._s.fetchone(
                "SELECT COUNT(*) FROM persona_replies WHERE persona_member_id = ?", (persona_member_id,)
            )
        return int(row[0])

    async def delete_member(self, member_id: str) -> int:
        """Delete the member's persona replies and every reply whose context quotes the member."""
        async with self._s.write() as db:
            cur = await db.execute(
                "DELETE FROM persona_replies WHERE persona_member_id = ? OR EXISTS "
                "(SELECT 1 FROM json_each(persona_replies.context_members_json) WHERE value = ?)",
                (member_id, member_id),
            )
            return cur.rowcount
