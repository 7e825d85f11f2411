"""The store: one SQLite file under DOPPEL_HOME (WAL, secure_delete, foreign keys), repositories as attributes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.settings import Settings
from data import migrations
from data.consents import ConsentReads
from data.crypto import Keyring, load_master_key
from data.errors import StoreError

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA secure_delete=ON",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=30000",
    "PRAGMA synchronous=NORMAL",
)


def connect_sync(settings: Settings) -> sqlite3.Connection:
    """A plain sqlite3 connection with the store's pragmas, for bulk work in a worker thread (import, bench)."""
    conn = sqlite3.connect(settings.db_path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def cipher_sync(conn: sqlite3.Connection, keyring: Keyring, member_id: str, create: bool) -> AESGCM | None:
    """A member's data cipher through a sync connection; creates the key when asked (inside the caller's txn)."""
    aead = keyring.cached(member_id)
    if aead is not None:
        return aead
    row = conn.execute("SELECT wrapped FROM member_keys WHERE member_id = ?", (member_id,)).fetchone()
    if row is not None:
        return keyring.unwrap(member_id, row[0])
    if not create:
        return None
    wrapped, aead = keyring.new_wrapped(member_id)
    conn.execute(
        "INSERT INTO member_keys(member_id, wrapped, created_at) VALUES (?, ?, ?)",
        (member_id, wrapped, time.time()),
    )
    keyring.remember(member_id, aead)
    return aead


class _Opening:
    """What `Store.open` returns: awaitable (`await Store.open(s)`) and an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: Store | None = None

    def __await__(self) -> Generator[Any, None, Store]:
        return Store._open(self._settings).__await__()

    async def __aenter__(self) -> Store:
        self._store = await Store._open(self._settings)
        return self._store

    async def __aexit__(self, *exc: object) -> None:
        if self._store is not None:
            await self._store.close()


class Store:
    """Async access to the database; repositories of the store's tables (jobs: `jobs.table`; adapters: `models`)."""

    def __init__(self, settings: Settings, db: aiosqlite.Connection, keyring: Keyring) -> None:
        from data.blindtests import BlindTestRepo
        from data.embeddings import EmbeddingRepo, FeedbackRepo
        from data.guilds import GuildRepo
        from data.joins import JoinRepo
        from data.members import KeyRepo, MemberRepo
        from data.messages import MessageRepo
        from data.personareplies import PersonaReplyRepo
        from data.serving import ServingRepo

        self.settings = settings
        self.db = db
        self.keyring = keyring
        self._write_lock = asyncio.Lock()
        # Keys created inside the open transaction: evicted from the cache if it rolls back.
        self.created_keys: list[str] = []
        self.keys = KeyRepo(self)
        self.members = MemberRepo(self)
        self.messages = MessageRepo(self)
        self.embeddings = EmbeddingRepo(self)
        self.feedback = FeedbackRepo(self)
        self.guilds = GuildRepo(self)
        self.blind_tests = BlindTestRepo(self)
        self.persona_replies = PersonaReplyRepo(self)
        self.joins = JoinRepo(self)
        self.serving = ServingRepo(self)
        # Reads of the consent tables (ConsentService writes them): the upload rule lives there.
        self.consents = ConsentReads(self)

    @classmethod
    def open(cls, settings: Settings) -> _Opening:
        """Open (creating and migrating) the store: `await Store.open(s)` or `async with Store.open(s) as store`."""
        return _Opening(settings)

    @classmethod
    async def _open(cls, settings: Settings) -> Store:
        settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        keyring = Keyring(load_master_key(settings.master_key, settings.key_path))
        db = await aiosqlite.connect(settings.db_path, isolation_level=None)
        try:
            for pragma in PRAGMAS:
                await db.execute(pragma)
            await migrations.apply(db)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(f"{settings.db_path}: {exc}") from exc
        try:
            os.chmod(settings.db_path, 0o600)
        except OSError:
            pass
        return cls(settings, db, keyring)

    async def close(self) -> None:
        """Close the connection (checkpointing the WAL into the main file)."""
        await self.db.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time on this connection; rolled back whole on any error."""
        async with self._write_lock:
            self.created_keys.clear()
            try:
                await self._settle("BEGIN IMMEDIATE")
                yield self.db
                await self._settle("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    await self._settle("ROLLBACK")
                for member_id in self.created_keys:
                    self.keyring.evict(member_id)
                raise
            finally:
                self.created_keys.clear()

    async def _settle(self, sql: str) -> None:
        """Run a transaction boundary to its end even if the caller is cancelled meanwhile, then re-raise that."""

        # aiosqlite's worker thread runs a statement whether or not its awaiter is still there: a task cancelled while
        # BEGIN waits (a heartbeat stopped as its job ends) would otherwise leave the shared connection inside a
        # transaction nobody closes, and every later write fails "cannot start a transaction within a transaction".
        async def statement() -> None:
            await self.db.execute(sql)

        task = asyncio.ensure_future(statement())
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            task.exception()  # retrieved here: the cancellation, not the statement's own error, is what propagates
            raise asyncio.CancelledError
        task.result()

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row | tuple[Any, ...]]:
        """All rows of a query."""
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or None."""
        async with self.db.execute(sql, params) as cur:
            return await cur.fetchone()

    async def with_scope(self, scope: str, member_ids: Iterable[str] | None = None) -> set[str]:
        """Members holding a consent scope (optionally only among `member_ids`): what the repositories check."""
        return await self.consents.with_scope(scope, member_ids)

    async def checkpoint(self) -> None:
        """Fold the WAL into the database file and truncate it, so deleted pages leave no copy behind."""
        await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def tables(self) -> list[str]:
        """Names of the user tables in the database."""
        rows = await self.fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        return sorted(r[0] for r in rows)
