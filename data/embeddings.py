"""Embedding vectors and persona feedback: both derived from member content, so both encrypted with the member key."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from data.crypto import seal, unseal

if TYPE_CHECKING:
    from data.database import Database


def _emb_ad(member_id: str, model: str, message_id: str) -> bytes:
    return f"emb\x00{member_id}\x00{model}\x00{message_id}".encode()


class EmbeddingRepo:
    """Vectors of stored messages per (member, embedding model); vectors can leak content, so they are sealed."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def put(self, member_id: str, model: str, items: Sequence[tuple[str, bytes]]) -> int:
        """Store (message_id, vector bytes) pairs of a `train`-consenting member; returns how many were written."""
        if not items or not await self._s.with_scope("train", [member_id]):
            return 0
        async with self._s.write() as db:
            aead = await self._s.keys.cipher(member_id, create=True)
            assert aead is not None
            rows = [
                (model, mid, member_id, seal(aead, vec, _emb_ad(member_id, model, mid))) for mid, vec in items
            ]
            before = db.total_changes
            await db.executemany(
                "INSERT OR REPLACE INTO embeddings(model, message_id, member_id, vector) VALUES (?, ?, ?, ?)",
                rows,
            )
            return db.total_changes - before

    async def get(
        self, member_id: str, model: str, message_ids: Sequence[str] | None = None
    ) -> list[tuple[str, bytes]]:
        """(message_id, vector bytes) of a member for one model, decrypted: all, or those of `message_ids`."""
        aead = await self._s.keys.cipher(member_id)
        if aead is None:
            return []
        if message_ids is None:
            rows = await self._s.fetchall(
                "SELECT message_id, vector FROM embeddings WHERE member_id = ? AND model = ? ORDER BY message_id",
                (member_id, model),
            )
        else:
            rows = []
            ids = sorted(set(message_ids))
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows += await self._s.fetchall(
                    "SELECT message_id, vector FROM embeddings WHERE member_id = ? AND model = ? AND message_id IN "
                    f"({', '.join('?' * len(chunk))}) ORDER BY message_id",
                    (member_id, model, *chunk),
                )
        out = []
        for mid, blob in rows:
            try:
                out.append((mid, unseal(aead, blob, _emb_ad(member_id, model, mid))))
            except InvalidTag:
                continue
        return out

    async def count(self, member_id: str | None = None) -> int:
        """How many vectors are stored (of one member)."""
        if member_id is None:
            row = await self._s.fetchone("SELECT COUNT(*) FROM embeddings")
        else:
            row = await self._s.fetchone("SELECT COUNT(*) FROM embeddings WHERE member_id = ?", (member_id,))
        return int(row[0])

    async def delete_member(self, member_id: str) -> int:
        """Delete every vector of a member."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM embeddings WHERE member_id = ?", (member_id,))
            return cur.rowcount


class FeedbackRepo:
    """👍/👎 on persona replies; the prompt and reply text are sealed with the persona member's key."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def add(
        self,
        persona_member_id: str,
        rater_id: str,
        value: int,
        *,
        adapter_id: str | None = None,
        guild_id: str | None = None,
        channel_id: str | None = None,
        message_id: str | None = None,
        prompt: str | None = None,
        reply: str | None = None,
    ) -> int:
        """Record one rating (+1 / -1); returns its row id."""
        if value not in (1, -1):
            raise ValueError("feedback value must be 1 or -1")
        async with self._s.write() as db:
            payload = None
            if prompt is not None or reply is not None:
                aead = await self._s.keys.cipher(persona_member_id, create=True)
                assert aead is not None
                text = json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False).encode()
                payload = seal(aead, text, f"fb\x00{persona_member_id}".encode())
            cur = await db.execute(
                "INSERT INTO feedback(persona_member_id, rater_id, value, adapter_id, guild_id, channel_id, message_id, "
                "payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    persona_member_id,
                    rater_id,
                    value,
                    adapter_id,
                    guild_id,
                    channel_id,
                    message_id,
                    payload,
                    time.time(),
                ),
            )
            return int(cur.lastrowid or 0)

    async def for_persona(self, persona_member_id: str) -> list[dict[str, Any]]:
        """Ratings of a persona, payload decrypted where the key still exists."""
        rows = await self._s.fetchall(
            "SELECT id, rater_id, value, adapter_id, guild_id, channel_id, message_id, payload, created_at "
            "FROM feedback WHERE persona_member_id = ? ORDER BY id",
            (persona_member_id,),
        )
        aead = await self._s.keys.cipher(persona_member_id)
        out = []
        for r in rows:
            item: dict[str, Any] = {
                "id": r[0],
                "persona_member_id": persona_member_id,
                "rater_id": r[1],
                "value": r[2],
                "adapter_id": r[3],
                "guild_id": r[4],
                "channel_id": r[5],
                "message_id": r[6],
                "created_at": r[8],
                "prompt": None,
                "reply": None,
            }
            if r[7] is not None and aead is not None:
                try:
                    item.update(json.loads(unseal(aead, r[7], f"fb\x00{persona_member_id}".encode())))
                except InvalidTag:
                    pass
            out.append(item)
        return out

    async def rated(self, message_id: str, rater_id: str) -> bool:
        """Whether `rater_id` already rated the persona reply `message_id`."""
        row = await self._s.fetchone(
            "SELECT 1 FROM feedback WHERE message_id = ? AND rater_id = ? LIMIT 1", (message_id, rater_id)
        )
        return row is not None

    async def given_by(self, rater_id: str) -> list[dict[str, Any]]:
        """Ratings a member gave (without the persona's sealed text)."""
        rows = await self._s.fetchall(
            "SELECT id, persona_member_id, value, adapter_id, created_at FROM feedback WHERE rater_id = ? ORDER BY id",
            (rater_id,),
        )
        return [
            {"id": r[0], "persona_member_id": r[1], "value": r[2], "adapter_id": r[3], "created_at": r[4]}
            for r in rows
        ]

    async def delete_member(self, member_id: str) -> int:
        """Delete ratings of the member's persona and ratings the member gave."""
        async with self._s.write() as db:
            cur = await db.execute(
                "DELETE FROM feedback WHERE persona_member_id = ? OR rater_id = ?", (member_id, member_id)
            )
            return cur.rowcount
