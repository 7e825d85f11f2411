"""Consent scopes per member, granted and revoked with an append-only audit trail (who, through which channel, when)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from consent.errors import ConsentError
from data.consents import UPLOAD
from data.errors import InvalidMemberIdError
from data.members import check_member_id

if TYPE_CHECKING:
    from consent.erasure import ErasureParts
    from data.store import Store

# `join` (a persona speaking unprompted) is its own opt-in: a `chat` grant never implies it.
SCOPES = ("train", "chat", "join")
CHANNELS = ("button", "command", "cli", UPLOAD)


def parse_scopes(scopes: Iterable[str] | str) -> list[str]:
    """Validate scope names ('train', 'chat', 'join'; comma-separated text accepted)."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    clean = sorted({s.strip().lower() for s in items if s.strip()})
    unknown = [s for s in clean if s not in SCOPES]
    if unknown or not clean:
        raise ConsentError(
            f"unknown consent scope(s): {', '.join(unknown) or '(none)'}; use {', '.join(SCOPES)}"
        )
    return clean


def _ids(member_ids: Iterable[str]) -> list[str]:
    try:
        ids = list(dict.fromkeys(check_member_id(m) for m in member_ids))
    except InvalidMemberIdError as exc:
        raise ConsentError(str(exc)) from None
    if not ids:
        raise ConsentError("no member ids given")
    return ids


class ConsentService:
    """Grant, revoke and list consent; revoking `train` erases the member's stored content with `erasure`'s parts."""

    def __init__(self, store: Store, erasure: ErasureParts | None = None) -> None:
        # The parts come from the composition root (`doppel.erasure`): this floor cannot import the higher ones.
        self._s = store
        self._erasure = erasure

    def _check(self, actor: str, channel: str) -> None:
        if channel not in CHANNELS:
            raise ConsentError(f"unknown consent channel {channel!r}; use {', '.join(CHANNELS)}")
        if not actor:
            raise ConsentError("consent changes need an actor")

    async def grant(
        self, member_ids: Iterable[str], scopes: Iterable[str] | str, actor: str, channel: str
    ) -> dict[str, list[str]]:
        """Grant scopes to members; returns {member_id: scopes newly granted}."""
        ids, wanted = _ids(member_ids), parse_scopes(scopes)
        self._check(actor, channel)
        now = time.time()
        changed: dict[str, list[str]] = {}
        async with self._s.write() as db:
            for m in ids:
                # A placeholder profile so the member is listed; the importer or bot fills in the name later.
                await db.execute(
                    "INSERT OR IGNORE INTO members(id, name, display_name, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (m, m, m, now, now),
                )
                changed[m] = []
                for scope in wanted:
                    cur = await db.execute(
                        "INSERT OR IGNORE INTO consent(member_id, scope, granted_at, actor, channel) VALUES (?, ?, ?, ?, ?)",
                        (m, scope, now, actor, channel),
                    )
                    if not cur.rowcount and channel != UPLOAD:
                        # A grant made with an uploaded export covers that export only (data.consents reads it so);
                        # granted again through any other channel it widens, so the row is re-stamped and audited.
                        cur = await db.execute(
                            "UPDATE consent SET granted_at = ?, actor = ?, channel = ? "
                            "WHERE member_id = ? AND scope = ? AND channel = 'upload'",
                            (now, actor, channel, m, scope),
                        )
                    if cur.rowcount:
                        changed[m].append(scope)
                        await self._audit(db, m, "grant", scope, actor, channel, now)
        return changed

    async def revoke(
        self, member_ids: Iterable[str], scopes: Iterable[str] | str, actor: str, channel: str
    ) -> dict[str, Any]:
        """Revoke scopes; members losing `train` have their stored content erased. Returns revoked scopes + erasures."""
        from consent.erasure import forget

        ids, wanted = _ids(member_ids), parse_scopes(scopes)
        self._check(actor, channel)
        erasure = self._erasure
        if "train" in wanted and erasure is None:
            # Refused before anything changes: a revoke that cannot erase must not look done.
            raise ConsentError(
                "revoking 'train' erases the member's data: this ConsentService has no erasure parts"
            )
        now = time.time()
        revoked: dict[str, list[str]] = {}
        async with self._s.write() as db:
            for m in ids:
                revoked[m] = []
                for scope in wanted:
                    cur = await db.execute(
                        "DELETE FROM consent WHERE member_id = ? AND scope = ?", (m, scope)
                    )
                    if cur.rowcount:
                        revoked[m].append(scope)
                        await self._audit(db, m, "revoke", scope, actor, channel, now)
        erased: dict[str, Any] = {}
        for m in ids:
            if "train" in wanted and erasure is not None:
                # Stored content exists only under `train` consent; withdrawing it withdraws the data and what was
                # trained on it. Run even when the scope was already gone, so a half-finished revoke completes.
                report = await forget(
                    self._s, self._s.settings, m, actor, channel, parts=erasure, keep_identity=True
                )
                erased[m] = report.to_dict()
        return {"revoked": revoked, "erased": erased}

    async def count(self) -> int:
        """How many members hold any scope."""
        row = await self._s.fetchone("SELECT COUNT(DISTINCT member_id) FROM consent")
        return int(row[0])

    async def scopes(self, member_id: str) -> set[str]:
        """Scopes a member currently holds."""
        rows = await self._s.fetchall("SELECT scope FROM consent WHERE member_id = ?", (member_id,))
        return {r[0] for r in rows}

    async def audit(self, member_id: str | None = None) -> list[dict[str, Any]]:
        """The audit trail (of one member), oldest first."""
        sql = "SELECT seq, member_id, action, scope, actor, channel, at FROM consent_audit"
        params: tuple[str, ...] = ()
        if member_id is not None:
            sql += " WHERE member_id = ?"
            params = (member_id,)
        rows = await self._s.fetchall(sql + " ORDER BY seq", params)
        keys = ("seq", "member_id", "action", "scope", "actor", "channel", "at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def list(self, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Members holding any scope: id, display name, scopes, when last granted; a page of `limit` after `after`.

        Keyset pages (ids sort as text, as they are stored): a server of thousands of members is read a page at a time.
        """
        where, params = ("WHERE c.member_id > ? ", [after]) if after is not None else ("", [])
        page = " LIMIT ?" if limit is not None else ""
        rows = await self._s.fetchall(
            "SELECT c.member_id, COALESCE(m.display_name, c.member_id), group_concat(c.scope), MAX(c.granted_at) "
            f"FROM consent c LEFT JOIN members m ON m.id = c.member_id {where}GROUP BY c.member_id "
            f"ORDER BY c.member_id{page}",
            (*params, *([limit] if limit is not None else [])),
        )
        return [
            {"member_id": r[0], "display_name": r[1], "scopes": sorted(r[2].split(",")), "granted_at": r[3]}
            for r in rows
        ]

    @staticmethod
    async def _audit(
        db: Any, member_id: str, action: str, scope: str, actor: str, channel: str, at: float
    ) -> None:
        await db.execute(
            "INSERT INTO consent_audit(member_id, action, scope, actor, channel, at) VALUES (?, ?, ?, ?, ?, ?)",
            (member_id, action, scope, actor, channel, at),
        )
