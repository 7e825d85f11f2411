"""Members and their wrapped data keys."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from data.errors import InvalidMemberIdError
from data.records import Member

if TYPE_CHECKING:
    from data.database import Database


class MemberRepo:
    """Members the store knows (only consenting ones get a name stored)."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def upsert(self, member: Member) -> None:
        """Insert or update a member's profile."""
        async with self._s.write() as db:
            await db.execute(UPSERT_SQL, member_row(member))

    async def get(self, member_id: str) -> Member | None:
        """A member by id."""
        row = await self._s.fetchone(
            "SELECT id, name, display_name, avatar_url, is_bot FROM members WHERE id = ?", (member_id,)
        )
        return None if row is None else Member(row[0], row[1], row[2], row[3], bool(row[4]))

    async def list(self) -> list[Member]:
        """Every member, by id."""
        rows = await self._s.fetchall(
            "SELECT id, name, display_name, avatar_url, is_bot FROM members ORDER BY id"
        )
        return [Member(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    async def display_names(self, member_ids: Sequence[str]) -> dict[str, str]:
        """Display names of those of `member_ids` the store knows (one query per 500 ids, not one per member)."""
        ids = list(dict.fromkeys(str(m) for m in member_ids))
        names: dict[str, str] = {}
        for start in range(0, len(ids), 500):  # below SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = await self._s.fetchall(
                f"SELECT id, display_name FROM members WHERE id IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            names.update({str(r[0]): str(r[1]) for r in rows})
        return names

    async def delete(self, member_id: str) -> int:
        """Remove a member's profile row."""
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM members WHERE id = ?", (member_id,))
            return cur.rowcount


UPSERT_SQL = """
INSERT INTO members(id, name, display_name, avatar_url, is_bot, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET name = excluded.name, display_name = excluded.display_name,
    avatar_url = excluded.avatar_url, is_bot = excluded.is_bot, updated_at = excluded.updated_at
"""


def member_row(member: Member) -> tuple[object, ...]:
    """Parameters for UPSERT_SQL."""
    now = time.time()
    return (member.id, member.name, member.display_name, member.avatar_url, int(member.is_bot), now, now)


class KeyRepo:
    """Per-member data keys, wrapped by the master key; deleting one crypto-shreds every copy of that content."""

    def __init__(self, store: Database) -> None:
        self._s = store

    async def cipher(self, member_id: str, create: bool = False) -> AESGCM | None:
        """The member's cipher; with create=True a key is made (call inside `store.write()` when creating)."""
        ring = self._s.keyring
        aead = ring.cached(member_id)
        if aead is not None:
            return aead
        row = await self._s.fetchone("SELECT wrapped FROM member_keys WHERE member_id = ?", (member_id,))
        if row is not None:
            return ring.unwrap(member_id, row[0])
        if not create:
            return None
        wrapped, aead = ring.new_wrapped(member_id)
        await self._s.db.execute(
            "INSERT INTO member_keys(member_id, wrapped, created_at) VALUES (?, ?, ?)",
            (member_id, wrapped, time.time()),
        )
        ring.remember(member_id, aead)
        self._s.created_keys.append(member_id)
        return aead

    async def exists(self, member_id: str) -> bool:
        """Whether a wrapped key is stored for the member."""
        return (
            await self._s.fetchone("SELECT 1 FROM member_keys WHERE member_id = ?", (member_id,)) is not None
        )

    async def delete(self, member_id: str) -> int:
        """Delete the wrapped key and forget the unwrapped one."""
        self._s.keyring.evict(member_id)
        async with self._s.write() as db:
            cur = await db.execute("DELETE FROM member_keys WHERE member_id = ?", (member_id,))
            return cur.rowcount


def check_member_id(text: str) -> str:
    """A Discord user id (a snowflake: 1 to 20 digits), or InvalidMemberIdError."""
    value = str(text).strip()
    if not (value.isascii() and value.isdigit() and 1 <= len(value) <= 20):
        raise InvalidMemberIdError(
            f"not a Discord user id: {text!r} (expected digits, e.g. 123456789012345678)"
        )
    return value
