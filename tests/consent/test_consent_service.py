"""Consent: grant / revoke / list with an append-only audit; revoking `train` erases stored content."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from consent.errors import ConsentError
from consent.service import ConsentService, parse_scopes
from core.settings import Settings
from data.records import Message
from data.store import Store
from doppel.erasure import erasure_parts
from tests.helpers.rows import seed_adapter

A, B = "100000000000000001", "100000000000000002"


def test_grant_revoke_list_and_audit(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            svc = ConsentService(store)
            assert await svc.grant([A, B, A], "train,chat", "admin", "cli") == {
                A: ["chat", "train"],
                B: ["chat", "train"],
            }
            assert await svc.grant([A], ["train"], "admin", "cli") == {A: []}  # nothing new, no audit line
            out = await svc.revoke([B], "chat", "B himself", "button")
            assert out["revoked"] == {B: ["chat"]} and out["erased"] == {}
            assert await svc.scopes(A) == {"train", "chat"} and await svc.scopes(B) == {"train"}
            assert [(m["member_id"], m["scopes"]) for m in await svc.list()] == [
                (A, ["chat", "train"]),
                (B, ["train"]),
            ]
            trail = await svc.audit(B)
            assert [(t["action"], t["scope"], t["actor"], t["channel"]) for t in trail] == [
                ("grant", "chat", "admin", "cli"),
                ("grant", "train", "admin", "cli"),
                ("revoke", "chat", "B himself", "button"),
            ]
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                async with store.write() as db:
                    await db.execute("UPDATE consent_audit SET actor = 'someone else'")

    asyncio.run(go())


@pytest.mark.parametrize(
    ("ids", "scopes", "channel", "needle"),
    [
        (["abc"], "train", "cli", "not a Discord user id"),
        ([A], "train,admin", "cli", "unknown consent scope"),
        ([A], "train", "carrier-pigeon", "unknown consent channel"),
        ([], "train", "cli", "no member ids"),
    ],
)
def test_bad_requests_are_rejected_before_any_change(
    settings: Settings, ids: list[str], scopes: str, channel: str, needle: str
) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            with pytest.raises(ConsentError, match=needle):
                await ConsentService(store).grant(ids, scopes, "x", channel)
            assert await store.fetchall("SELECT * FROM consent_audit") == []

    asyncio.run(go())


def test_parse_scopes() -> None:
    assert parse_scopes(" Train , chat,train ") == ["chat", "train"]
    with pytest.raises(ConsentError):
        parse_scopes("")


def test_revoking_train_erases_content_but_keeps_chat(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            svc = ConsentService(store, erasure_parts())
            await svc.grant([A, B], "train,chat", "admin", "cli")
            await store.messages.add_many(
                [
                    Message("1", None, "c", "c", A, "a", 1.0, "mine"),
                    Message("2", None, "c", "c", B, "b", 1.0, "theirs"),
                ]
            )
            adapter = await seed_adapter(store, member_id=B, lineage=[A])
            out = await svc.revoke([A], "train", "A", "command")
            assert out["erased"][A]["parts"]["messages"] == 1
            assert [a["id"] for a in out["erased"][A]["adapters_retired"]] == [adapter.id]
            assert await store.messages.count(A) == 0 and await store.messages.count(B) == 1
            assert not await store.keys.exists(A)
            assert await svc.scopes(A) == {"chat"}
            assert await store.members.get(A) is not None  # identity kept: only `forget` removes the member
            # Future storage stops too.
            assert await store.messages.add_many([Message("3", None, "c", "c", A, "a", 2.0, "later")]) == 0

    asyncio.run(go())
