"""Reads of the `consent` tables for the layers below and beside `consent/` (whose `ConsentService` writes them).

The upload rule lives here and only here: a `train` grant made with an uploaded export (channel 'upload') covers
that member's own upload, not live recording, not an admin's server import, not someone else's upload.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

UPLOAD = "upload"
# `train` consent covering messages whose source belongs to `?` (an upload's owner; '' for live or server imports).
_TRAIN_COVERS = "scope = 'train' AND (channel != 'upload' OR member_id = ?)"
_NO_UPLOAD = ""
# The members holding `train`, as a subquery for reads that join it with other tables (the "ready to train" list).
TRAIN_HOLDERS = "SELECT member_id FROM consent WHERE scope = 'train'"


class _Queries(Protocol):
    """What the reads need of the store (`data.store.Store`)."""

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row | tuple[Any, ...]]: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any: ...


def train_covering(conn: sqlite3.Connection, upload_owner: str | None) -> set[str]:
    """Members whose `train` consent covers an import: everyone's but upload-only grants, plus the upload's owner."""
    sql = f"SELECT member_id FROM consent WHERE {_TRAIN_COVERS}"
    return {r[0] for r in conn.execute(sql, (upload_owner or _NO_UPLOAD,))}


class ConsentReads:
    """Who holds which scope and what their `train` grant covers: the store's, the importer's and the bot's reads."""

    def __init__(self, store: _Queries) -> None:
        self._s = store

    async def with_scope(self, scope: str, member_ids: Iterable[str] | None = None) -> set[str]:
        """Members holding a consent scope (optionally only among `member_ids`)."""
        rows = await self._s.fetchall("SELECT member_id FROM consent WHERE scope = ?", (scope,))
        found = {r[0] for r in rows}
        return found if member_ids is None else found & set(member_ids)

    async def records_live(self, member_id: str) -> bool:
        """Whether the member's live messages may be recorded: `train` granted other than with an uploaded export."""
        row = await self._s.fetchone(
            f"SELECT 1 FROM consent WHERE member_id = ? AND {_TRAIN_COVERS}", (member_id, _NO_UPLOAD)
        )
        return row is not None

    async def upload_only(self, member_id: str) -> bool:
        """Whether the member holds `train` through an uploaded export only (their live messages are not recorded)."""
        row = await self._s.fetchone(
            "SELECT 1 FROM consent WHERE member_id = ? AND scope = 'train' AND channel = ?",
            (member_id, UPLOAD),
        )
        return row is not None

    async def of_member(self, member_id: str) -> dict[str, list[dict[str, Any]]]:
        """The member's scopes and audit trail, as the member's data export holds them."""
        scopes = await self._s.fetchall(
            "SELECT scope, granted_at, actor, channel FROM consent WHERE member_id = ? ORDER BY scope",
            (member_id,),
        )
        audit = await self._s.fetchall(
            "SELECT action, scope, actor, channel, at FROM consent_audit WHERE member_id = ? ORDER BY seq",
            (member_id,),
        )
        return {
            "consent": [
                dict(zip(("scope", "granted_at", "actor", "channel"), r, strict=True)) for r in scopes
            ],
            "consent_audit": [
                dict(zip(("action", "scope", "actor", "channel", "at"), r, strict=True)) for r in audit
            ],
        }
