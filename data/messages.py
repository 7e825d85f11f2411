"""Messages: content encrypted with the author's data key; only members with `train` consent are stored."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from data.consents import TRAIN_HOLDERS
from data.crypto import message_ad, seal, unseal
from data.records import Message

if TYPE_CHECKING:
    from data.database import Database

COLUMNS = (
    "id, guild_id, channel_id, channel_name, author_id, author_name, created_at, edited_at, reply_to, "
    "reactions_json, attachments, source, content"
)
INSERT_SQL = f"INSERT OR IGNORE INTO messages({COLUMNS}, stored_at) VALUES ({', '.join('?' * 14)})"


def message_row(msg: Message, blob: bytes, now: float) -> tuple[Any, ...]:
    """Parameters for INSERT_SQL (content already sealed)."""
    return (
        msg.id,
        msg.guild_id,
        msg.channel_id,
        msg.channel_name,
        msg.author_id,
        msg.author_name,
        msg.created_at,
        msg.edited_at,
        msg.reply_to,
        json.dumps(msg.reactions, ensure_ascii=False) if msg.reactions else "{}",
        msg.attachments,
        msg.source,
        blob,
        now,
    )


class MessageRepo:
    """Stored messages of consenting members."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def add_many(self, messages: Sequence[Message]) -> int:
        """Store new messages of members holding `train` consent (others are dropped); returns how many were stored."""
        if not messages:
            return 0
        allowed = await self._s.with_scope("train", {m.author_id for m in messages})
        now = time.time()
        stored = 0
        async with self._s.write() as db:
            rows = []
            for msg in messages:
                if msg.author_id not in allowed:
                    continue
                aead = await self._s.keys.cipher(msg.author_id, create=True)
                assert aead is not None
                blob = seal(aead, msg.content.encode(), message_ad(msg.author_id, msg.id))
                rows.append(message_row(msg, blob, now))
            before = db.total_changes
            await db.executemany(INSERT_SQL, rows)
            stored = db.total_changes - before
        return stored

    async def get(self, message_id: str) -> Message | None:
        """One message, decrypted."""
        row = await self._s.fetchone(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (message_id,))
        if row is None:
            return None
        return await self._decode(row)

    async def edit(self, message_id: str, content: str, edited_at: float) -> bool:
        """Replace a stored message's content; its embeddings are dropped (they encode the old text)."""
        async with self._s.write() as db:
            row = await self._s.fetchone("SELECT author_id FROM messages WHERE id = ?", (message_id,))
            if row is None:
                return False
            aead = await self._s.keys.cipher(row[0], create=False)
            if aead is None:
                return False
            blob = seal(aead, content.encode(), message_ad(row[0], message_id))
            await db.execute(
                "UPDATE messages SET content = ?, edited_at = ? WHERE id = ?", (blob, edited_at, message_id)
            )
            await db.execute("DELETE FROM embeddings WHERE message_id = ?", (message_id,))
        return True

    async def delete(self, message_id: str) -> bool:
        """Delete a message and its embeddings."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            await db.execute("DELETE FROM embeddings WHERE message_id = ?", (message_id,))
            return cur.rowcount > 0

    async def delete_member(self, member_id: str) -> int:
        """Delete every message a member wrote."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM messages WHERE author_id = ?", (member_id,))
            return cur.rowcount

    async def count(self, author_id: str | None = None) -> int:
        """How many messages are stored (of one author)."""
        if author_id is None:
            row = await self._s.fetchone("SELECT COUNT(*) FROM messages")
        else:
            row = await self._s.fetchone("SELECT COUNT(*) FROM messages WHERE author_id = ?", (author_id,))
        return int(row[0])

    async def train_ready(
        self, min_messages: int, *, excluding: Collection[str] = (), limit: int | None = None
    ) -> dict[str, int]:
        """Authors holding `train` consent with at least `min_messages` stored messages, with their counts.

        Most messages first; `excluding` leaves members out (any number: one JSON parameter); `limit` caps the answer.
        """
        skip, params = self._excluding(excluding)
        rows = await self._s.fetchall(
            f"SELECT m.author_id, COUNT(*) FROM messages m WHERE m.author_id IN ({TRAIN_HOLDERS}){skip} "
            "GROUP BY m.author_id HAVING COUNT(*) >= ? ORDER BY COUNT(*) DESC, m.author_id"
            + (" LIMIT ?" if limit is not None else ""),
            (*params, min_messages, *((limit,) if limit is not None else ())),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def count_train_ready(self, min_messages: int, *, excluding: Collection[str] = ()) -> int:
        """How many authors `train_ready` would list without a limit."""
        skip, params = self._excluding(excluding)
        row = await self._s.fetchone(
            "SELECT COUNT(*) FROM (SELECT m.author_id FROM messages m "
            f"WHERE m.author_id IN ({TRAIN_HOLDERS}){skip} GROUP BY m.author_id HAVING COUNT(*) >= ?)",
            (*params, min_messages),
        )
        return int(row[0]) if row else 0

    @staticmethod
    def _excluding(member_ids: Collection[str]) -> tuple[str, tuple[str, ...]]:
        """The SQL condition (and its parameter) leaving `member_ids` out of a query on `messages m`."""
        if not member_ids:
            return "", ()
        return " AND m.author_id NOT IN (SELECT value FROM json_each(?))", (json.dumps(sorted(member_ids)),)

    async def authors(self) -> set[str]:
        """Ids of every member with stored messages."""
        return {r[0] for r in await self._s.fetchall("SELECT DISTINCT author_id FROM messages")}

    async def channels_of(self, member_id: str) -> list[str]:
        """Channel ids where the member has stored messages."""
        rows = await self._s.fetchall(
            "SELECT DISTINCT channel_id FROM messages WHERE author_id = ? ORDER BY channel_id", (member_id,)
        )
        return [r[0] for r in rows]

    async def iter_channels(self, channel_ids: Sequence[str]) -> AsyncIterator[Message]:
        """Every stored message of these channels, decrypted, ordered by channel then time."""
        for channel_id in sorted(set(channel_ids)):
            last_ts, last_id = float("-inf"), ""
            while True:
                # Keyset pages: no cursor held open across yields, so writers are never blocked by a slow reader.
                rows = await self._s.fetchall(
                    f"SELECT {COLUMNS} FROM messages WHERE channel_id = ? AND (created_at, id) > (?, ?) "
                    "ORDER BY created_at, id LIMIT 1000",
                    (channel_id, last_ts, last_id),
                )
                if not rows:
                    break
                for row in rows:
                    msg = await self._decode(row)
                    if msg is not None:
                        yield msg
                last_ts, last_id = rows[-1][6], rows[-1][0]

    async def member_windows(self, member_id: str, before_s: float) -> dict[str, list[tuple[float, float]]]:
        """Per channel, the time spans [t - before_s, t] around the member's messages, overlapping spans merged.

        Reads timestamps only (no content): its size follows the member's own activity, not the community's.
        """
        rows = await self._s.fetchall(
            "SELECT channel_id, created_at FROM messages WHERE author_id = ? ORDER BY channel_id, created_at",
            (member_id,),
        )
        spans: dict[str, list[tuple[float, float]]] = {}
        for channel_id, at in rows:
            own = spans.setdefault(channel_id, [])
            if own and at - before_s <= own[-1][1]:
                own[-1] = (own[-1][0], at)
            else:
                own.append((at - before_s, at))
        return spans

    async def iter_windows(self, spans: dict[str, list[tuple[float, float]]]) -> AsyncIterator[Message]:
        """Stored messages inside the given time spans of each channel, decrypted, by channel then time."""
        for channel_id in sorted(spans):
            for lo, hi in spans[channel_id]:
                last_ts, last_id = lo, ""
                first = True
                while True:
                    # Keyset pages as in iter_channels; the first page includes messages exactly at `lo`.
                    rows = await self._s.fetchall(
                        f"SELECT {COLUMNS} FROM messages WHERE channel_id = ? AND created_at <= ? AND "
                        f"{'created_at >= ?' if first else '(created_at, id) > (?, ?)'} "
                        "ORDER BY created_at, id LIMIT 1000",
                        (channel_id, hi, last_ts) if first else (channel_id, hi, last_ts, last_id),
                    )
                    first = False
                    if not rows:
                        break
                    for row in rows:
                        msg = await self._decode(row)
                        if msg is not None:
                            yield msg
                    last_ts, last_id = rows[-1][6], rows[-1][0]

    async def get_many(self, message_ids: Sequence[str]) -> list[Message]:
        """Messages by id (those stored and readable), decrypted, in time order."""
        out: list[Message] = []
        ids = sorted(set(message_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await self._s.fetchall(
                f"SELECT {COLUMNS} FROM messages WHERE id IN ({', '.join('?' * len(chunk))})", tuple(chunk)
            )
            for row in rows:
                msg = await self._decode(row)
                if msg is not None:
                    out.append(msg)
        out.sort(key=lambda m: (m.created_at, m.id))
        return out

    async def recent_for_member(self, member_id: str, limit: int, min_chars: int = 0) -> list[Message]:
        """The member's latest `limit` messages (of at least `min_chars` characters), decrypted, oldest first.

        Reads newest first in pages and stops at `limit`: a member with years of history costs `limit` rows.
        """
        out: list[Message] = []
        last_ts, last_id = float("inf"), "\U0010ffff"
        while len(out) < limit:
            rows = await self._s.fetchall(
                f"SELECT {COLUMNS} FROM messages WHERE author_id = ? AND (created_at, id) < (?, ?) "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (member_id, last_ts, last_id, min(1000, max(limit, 1))),
            )
            if not rows:
                break
            for row in rows:
                msg = await self._decode(row)
                if msg is not None and len(msg.content.strip()) >= min_chars:
                    out.append(msg)
                    if len(out) >= limit:
                        break
            last_ts, last_id = rows[-1][6], rows[-1][0]
        out.reverse()
        return out

    async def authors_in_guild(self, guild_id: str, member_ids: Sequence[str]) -> set[str]:
        """Which of `member_ids` have stored messages on this server (one query per 500 ids)."""
        found: set[str] = set()
        ids = sorted(set(member_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await self._s.fetchall(
                f"SELECT id FROM members WHERE id IN ({', '.join('?' * len(chunk))}) AND EXISTS "
                "(SELECT 1 FROM messages WHERE author_id = members.id AND guild_id = ?)",
                (*chunk, guild_id),
            )
            found |= {str(r[0]) for r in rows}
        return found

    async def others_before(self, member_id: str, limit: int, window_s: float) -> dict[str, float | None]:
        """For the member's latest `limit` messages: when someone else last wrote in that channel within `window_s`
        before each (timestamps only, no content), by message id."""
        rows = await self._s.fetchall(
            "SELECT m.id, (SELECT MAX(p.created_at) FROM messages p WHERE p.channel_id = m.channel_id "
            "AND p.created_at < m.created_at AND p.created_at >= m.created_at - ? AND p.author_id != m.author_id) "
            "FROM messages m WHERE m.author_id = ? ORDER BY m.created_at DESC LIMIT ?",
            (window_s, member_id, limit),
        )
        return {str(r[0]): (float(r[1]) if r[1] is not None else None) for r in rows}

    async def for_member(self, member_id: str) -> list[Message]:
        """Every stored message of one member, decrypted, by time."""
        rows = await self._s.fetchall(
            f"SELECT {COLUMNS} FROM messages WHERE author_id = ? ORDER BY created_at, id", (member_id,)
        )
        out = []
        for row in rows:
            msg = await self._decode(row)
            if msg is not None:
                out.append(msg)
        return out

    async def _decode(self, row: Any) -> Message | None:
        aead = await self._s.keys.cipher(row[4])
        if aead is None:
            return None  # key shredded: the content is gone for good
        try:
            content = unseal(aead, row[12], message_ad(row[4], row[0])).decode()
        except InvalidTag:
            return None
        return Message(
            id=row[0],
            guild_id=row[1],
            channel_id=row[2],
            channel_name=row[3],
            author_id=row[4],
            author_name=row[5],
            created_at=row[6],
            edited_at=row[7],
            reply_to=row[8],
            reactions=json.loads(row[9] or "{}"),
            attachments=row[10],
            source=row[11],
            content=content,
        )
