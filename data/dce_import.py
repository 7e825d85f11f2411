"""DiscordChatExporter JSON import: streamed with ijson, one transaction per file, only `train`-consenting authors."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ijson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from data.consents import train_covering
from data.crypto import Keyring, message_ad, seal
from data.errors import ImportFileError
from data.members import UPSERT_SQL, member_row
from data.messages import INSERT_SQL
from data.records import Member
from data.store import cipher_sync, connect_sync

if TYPE_CHECKING:
    from core.settings import Settings
    from data.store import Store

# yajl2_c builds objects in C: several times faster than the pure-Python backend, and it streams.
_IJSON = ijson.get_backend("yajl2_c")
STORED_TYPES = frozenset({"Default", "Reply"})
CHUNK = 64 * 1024


class _ShapeError(Exception):
    """The JSON parses but is not a DiscordChatExporter export."""


class _CountingReader:
    """File wrapper that counts bytes and newlines handed to the parser, to say where an error is."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.pos = 0
        self.lines = 1

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.pos += len(data)
        self.lines += data.count(b"\n")
        return data


@dataclass
class FileReport:
    """Counts for one export file."""

    path: str
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    already_stored: int = 0
    updated: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "path": self.path,
            "read": self.read,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "already_stored": self.already_stored,
            "updated": self.updated,
            "skipped": dict(sorted(self.skipped.items())),
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given and `*.json` files under folders (sorted); a missing path is an error before anything runs."""
    out: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*.json") if p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise ImportFileError(f"{path}: no such file or folder")
    if not out:
        raise ImportFileError(f"no .json export files found in {', '.join(str(p) for p in paths)}")
    return list(dict.fromkeys(out))


def utc_epoch(text: Any) -> float:
    """ISO-8601 timestamp with a local offset (any fraction length) -> UTC epoch seconds."""
    if not isinstance(text, str):
        raise _ShapeError(f"timestamp is not a string: {text!r}")
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise _ShapeError(f"bad timestamp {text!r}") from None
    if stamp.tzinfo is None:
        raise _ShapeError(f"timestamp without a UTC offset: {text!r}")
    return stamp.timestamp()


def _header(path: Path, key: str) -> Any:
    """The first top-level `key` object of the file (DCE writes guild and channel before messages)."""
    with path.open("rb") as fh:
        reader = _CountingReader(fh)
        try:
            return next(_IJSON.items(reader, key, use_float=True), None)
        except (ijson.JSONError, UnicodeDecodeError) as exc:
            raise ImportFileError(_json_error(path, reader, exc)) from None


def _json_error(path: Path, reader: _CountingReader, exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines()]
    first = lines[0] if lines and lines[0] else type(exc).__name__
    if "premature EOF" in first:
        return f"{path}: truncated JSON: ends at byte {reader.pos} (line {reader.lines}) before the export is complete"
    near = f" near {lines[1][:40]!r}" if len(lines) > 1 and lines[1] else ""
    # The parser reads 64 KiB at a time: the error lies in the last chunk it was given.
    start = max(0, reader.pos - CHUNK)
    return (
        f"{path}: invalid JSON between bytes {start} and {reader.pos} (line <= {reader.lines}): {first}{near}"
    )


def _reactions(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if not isinstance(items, list):
        return out
    for r in items:
        emoji = r.get("emoji") if isinstance(r, dict) else None
        if not isinstance(emoji, dict):
            continue
        name = emoji.get("name") or emoji.get("code") or emoji.get("id")
        count = r.get("count")
        # A count of another JSON type (or NaN, negative) is noise in a broken export, not a reason to crash.
        n = (
            int(count)
            if isinstance(count, (int, float)) and not isinstance(count, bool) and 0 <= count < 2**53
            else 0
        )
        if name:
            out[str(name)] = out.get(str(name), 0) + n
    return out


def _snowflake(value: Any) -> str | None:
    """A Discord id as DCE writes it (digits; a number from another exporter is accepted), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return value
    return None


class _FileImport:
    """One file's import inside one transaction on a sync connection."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        keyring: Keyring,
        path: Path,
        batch: int,
        source: str,
        only_authors: frozenset[str] | None = None,
        upload_owner: str | None = None,
    ) -> None:
        self.conn, self.keyring, self.path, self.batch_size, self.source = conn, keyring, path, batch, source
        self.only_authors = only_authors
        self.upload_owner = upload_owner
        self.report = FileReport(str(path))
        self.created_keys: list[str] = []
        self.members: dict[str, Member] = {}

    def run(self) -> FileReport:
        started = time.perf_counter()
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._messages()
            conn.executemany(UPSERT_SQL, [member_row(m) for m in self.members.values()])
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            for member_id in self.created_keys:
                self.keyring.evict(member_id)  # the key row was rolled back with the file
            kept = self.report.read
            self.report = FileReport(str(self.path), read=kept)
            self.report.error = str(exc) if isinstance(exc, ImportFileError) else f"{self.path}: {exc}"
            if not isinstance(exc, (ImportFileError, sqlite3.Error)):
                raise
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _messages(self) -> None:
        path, rep = self.path, self.report
        channel = _header(path, "channel")
        if not isinstance(channel, dict) or not channel.get("id"):
            raise ImportFileError(f"{path}: not a DiscordChatExporter export (no channel object with an id)")
        guild = _header(path, "guild")
        guild_id = (
            str(guild["id"]) if isinstance(guild, dict) and guild.get("id") not in (None, "", "0") else None
        )
        channel_id, channel_name = str(channel["id"]), channel.get("name")
        # An upload-only grant counts for that member's own upload alone (the rule is data.consents').
        train = train_covering(self.conn, self.upload_owner)
        self.start_rowid = self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()[0]
        now = time.time()
        batch: list[tuple[Any, ...]] = []
        ciphers: dict[str, AESGCM] = {}
        skipped = rep.skipped
        with path.open("rb") as fh:
            reader = _CountingReader(fh)
            try:
                for m in _IJSON.items(reader, "messages.item", use_float=True):
                    rep.read += 1
                    row = self._row(m, train, ciphers, guild_id, channel_id, channel_name, now)
                    if isinstance(row, str):
                        skipped[row] += 1
                        continue
                    batch.append(row)
                    if len(batch) >= self.batch_size:
                        self._flush(batch)
                        batch = []
            except (ijson.JSONError, UnicodeDecodeError) as exc:
                raise ImportFileError(_json_error(path, reader, exc)) from None
            except _ShapeError as exc:
                raise ImportFileError(
                    f"{path}: message #{rep.read - 1} (near byte {reader.pos}, line <= {reader.lines}): {exc}"
                ) from None
            if rep.read == 0 and not self._has_messages_array(path):
                raise ImportFileError(f"{path}: not a DiscordChatExporter export (no messages array)")
        self._flush(batch)

    @staticmethod
    def _has_messages_array(path: Path) -> bool:
        with path.open("rb") as fh:
            for prefix, event, _ in _IJSON.parse(fh):
                if prefix == "messages" and event == "start_array":
                    return True
        return False

    def _row(
        self,
        m: Any,
        train: set[str],
        ciphers: dict[str, AESGCM],
        guild_id: str | None,
        channel_id: str,
        channel_name: str | None,
        now: float,
    ) -> tuple[Any, ...] | str:
        """The insert parameters of one message, or the reason it is skipped."""
        if not isinstance(m, dict):
            raise _ShapeError("message is not an object")
        author = m.get("author")
        if not isinstance(author, dict) or not author.get("id") or not m.get("id"):
            raise _ShapeError("message without id or author.id")
        message_id, author_id = _snowflake(m["id"]), _snowflake(author["id"])
        if message_id is None or author_id is None:
            raise _ShapeError(
                f"id is not a Discord snowflake: {m['id'] if message_id is None else author['id']!r:.40}"
            )
        kind = m.get("type", "Default")
        if not isinstance(kind, str):
            raise _ShapeError(f"message type is not a string: {kind!r:.40}")
        if kind not in STORED_TYPES:
            return "system"
        if author.get("isBot"):
            return "bot"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            if m.get("attachments"):
                return "attachment_only"
            return "sticker_only" if m.get("stickers") else "empty"
        if self.only_authors is not None and author_id not in self.only_authors:
            return "other_author"
        if author_id not in train:
            return "no_consent"
        aead: AESGCM | None = ciphers.get(author_id)
        if aead is None:
            had = self.keyring.cached(author_id) is not None
            aead = cipher_sync(self.conn, self.keyring, author_id, create=True)
            if not had and self.keyring.cached(author_id) is not None:
                self.created_keys.append(author_id)
            assert aead is not None
            ciphers[author_id] = aead
        name = str(author.get("name") or author_id)
        display = str(author.get("nickname") or name)
        known = self.members.get(author_id)
        if known is None or known.display_name != display:
            self.members[author_id] = Member(author_id, name, display, author.get("avatarUrl"), False)
        edited = m.get("timestampEdited")
        ref = m.get("reference")
        reactions = _reactions(m.get("reactions"))
        attachments = m.get("attachments")
        return (
            message_id,
            guild_id,
            channel_id,
            channel_name,
            author_id,
            display,
            utc_epoch(m.get("timestamp")),
            utc_epoch(edited) if edited else None,
            str(ref["messageId"]) if isinstance(ref, dict) and ref.get("messageId") else None,
            json.dumps(reactions, ensure_ascii=False) if reactions else "{}",
            len(attachments) if isinstance(attachments, list) else 0,
            self.source,
            seal(aead, content.encode("utf-8", "replace"), message_ad(author_id, message_id)),
            now,
        )

    def _flush(self, batch: list[tuple[Any, ...]]) -> None:
        """Insert a batch, telling in-file duplicates from messages stored before this file."""
        if not batch:
            return
        rep, conn = self.report, self.conn
        ids = [r[0] for r in batch]
        existing: dict[str, tuple[int, str, float | None]] = {}
        for i in range(0, len(ids), 900):
            part = ids[i : i + 900]
            q = f"SELECT id, rowid, channel_id, edited_at FROM messages WHERE id IN ({', '.join('?' * len(part))})"
            existing.update((r[0], (r[1], r[2], r[3])) for r in conn.execute(q, part))
        fresh: list[tuple[Any, ...]] = []
        edits: list[tuple[Any, ...]] = []
        seen: set[str] = set()
        for row in batch:
            mid = row[0]
            if mid in seen:
                rep.duplicates += 1
            elif mid in existing:
                rowid, channel, edited_at = existing[mid]
                if channel != row[2] and mid not in (channel, row[2]):
                    # Snowflakes are unique across Discord: the same id in another channel is a broken export,
                    # unless that channel is the thread started from this message (DCE 2.48 exports the starter
                    # in the thread too, and the thread's id is the message's).
                    rep.skipped["id_conflict"] += 1
                elif rowid > self.start_rowid:
                    rep.duplicates += 1
                else:
                    rep.already_stored += 1
                    # A later edit wins: a member who edited something out expects the stored copy to follow.
                    if row[7] is not None and (edited_at is None or row[7] > edited_at):
                        edits.append((row[12], row[7], mid))
            else:
                seen.add(mid)
                fresh.append(row)
        if edits:
            conn.executemany("UPDATE messages SET content = ?, edited_at = ? WHERE id = ?", edits)
            conn.executemany("DELETE FROM embeddings WHERE message_id = ?", [(e[2],) for e in edits])
            rep.updated += len(edits)
        before = conn.total_changes
        conn.executemany(INSERT_SQL, fresh)
        rep.stored += conn.total_changes - before


def import_files_sync(
    settings: Settings,
    keyring: Keyring,
    paths: Sequence[Path],
    source: str = "import",
    only_authors: frozenset[str] | None = None,
    upload_owner: str | None = None,
) -> list[FileReport]:
    """Import files one transaction each on a private sync connection (run in a worker thread)."""
    conn = connect_sync(settings)
    try:
        batch = settings.store.import_batch_size
        return [
            _FileImport(conn, keyring, path, batch, source, only_authors, upload_owner).run()
            for path in paths
        ]
    finally:
        conn.close()


def summarize(reports: Sequence[FileReport]) -> dict[str, Any]:
    """Per-file and total counts."""
    total: Counter[str] = Counter()
    for r in reports:
        total.update(r.skipped)
    return {
        "files": [r.to_dict() for r in reports],
        "total": {
            "files": len(reports),
            "failed": sum(1 for r in reports if r.error),
            "read": sum(r.read for r in reports if not r.error),
            "stored": sum(r.stored for r in reports),
            "duplicates": sum(r.duplicates for r in reports),
            "already_stored": sum(r.already_stored for r in reports),
            "updated": sum(r.updated for r in reports),
            "skipped": dict(sorted(total.items())),
        },
    }


async def import_exports(
    store: Store,
    paths: Sequence[str | Path],
    source: str = "import",
    only_authors: Iterable[str] | None = None,
    upload_owner: str | None = None,
) -> dict[str, Any]:
    """Import DiscordChatExporter files or folders; a failed file is rolled back whole and reported, others import.

    `only_authors` limits storage to those members; `upload_owner` is the member whose own upload this is (their
    upload-only consent counts for this file, nobody else's does).
    """
    files = expand_paths(paths)
    limit = frozenset(only_authors) if only_authors is not None else None
    reports = await asyncio.to_thread(
        import_files_sync, store.settings, store.keyring, files, source, limit, upload_owner
    )
    return summarize(reports)


def iter_message_ids(path: Path) -> Iterator[str]:
    """Message ids of an export, streamed (used by tests and the benchmark)."""
    with path.open("rb") as fh:
        for item in _IJSON.items(fh, "messages.item.id"):
            yield str(item)
