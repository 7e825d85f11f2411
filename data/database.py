"""What the repositories need from the store: the seam that lets `Store` own them without them importing it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import aiosqlite
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.settings import Settings
from data.crypto import Keyring


class Ciphers(Protocol):
    """Per-member content keys (the `member_keys` table's owner)."""

    async def cipher(self, member_id: str, create: bool = False) -> AESGCM | None: ...


class Database(Protocol):
    """The open store as a repository sees it: queries, one write transaction at a time, keys."""

    settings: Settings
    db: aiosqlite.Connection
    keyring: Keyring
    created_keys: list[str]

    @property
    def keys(self) -> Ciphers: ...

    def write(self) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row | tuple[Any, ...]]: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    async def with_scope(self, scope: str, member_ids: Iterable[str] | None = None) -> set[str]: ...
