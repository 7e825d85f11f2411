"""Joining in: the `join` scope is its own opt-in (old grants keep, `chat` never implies it), channels' levels,
members' silences, and erasure and the data export reaching what is stored for it."""

from __future__ import annotations

import asyncio
import time

import aiosqlite
import pytest

from consent.erasure import forget
from consent.errors import ConsentError
from consent.export import member_export
from consent.service import ConsentService
from core.settings import Settings
from data import migrations
from data.joins import EVERYWHERE
from data.store import Store
from doppel.erasure import erasure_parts

ALICE, BOB = "111111111111111111", "222222222222222222"


def test_migration_keeps_old_grants_and_adds_the_join_scope(settings: Settings) -> None:
    async def scenario() -> None:
        settings.home.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(settings.db_path, isolation_level=None)
        before = migrations.MIGRATIONS[: migrations.MIGRATIONS.index(migrations.m005_join_in)]
        await migrations.apply(db, before)
        await db.execute(
            "INSERT INTO consent(member_id, scope, granted_at, actor, channel) VALUES (?, 'chat', ?, 'a', 'cli')",
            (ALICE, time.time()),
        )
        with pytest.raises(Exception, match="CHECK"):
            await db.execute(
                "INSERT INTO consent(member_id, scope, granted_at, actor, channel) VALUES (?, 'join', 1, 'a', 'cli')",
                (BOB,),
            )
        assert (await migrations.apply(db))[0] == "m005_join_in"
        await db.close()
        async with Store.open(settings) as store:
            service = ConsentService(store)
            assert await service.scopes(ALICE) == {"chat"}, "an old chat grant does not become a join grant"
            assert await service.grant([ALICE], "join", "a", "button") == {ALICE: ["join"]}
            assert await service.scopes(ALICE) == {"chat", "join"}
            await service.revoke([ALICE], "join", "a", "button")
            assert await service.scopes(ALICE) == {"chat"}

    asyncio.run(scenario())


def test_unknown_scope_is_refused() -> None:
    from consent.service import parse_scopes

    assert parse_scopes("join,chat") == ["chat", "join"]
    with pytest.raises(ConsentError, match="use train, chat, join"):
        parse_scopes("lurk")


def test_levels_silences_erasure_and_export(settings: Settings) -> None:
    async def scenario() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([ALICE, BOB], ["train", "chat", "join"], "a", "cli")
            joins = store.joins
            assert await joins.level("50") is None
            await joins.set_level("1", "50", "normal", set_by=ALICE)
            await joins.set_level("1", "51", "quiet", set_by=BOB)
            assert await joins.channels("1") == {"50": "normal", "51": "quiet"}
            await joins.set_level("1", "51", None, set_by=BOB)
            assert await joins.level("51") is None
            await joins.silence(ALICE, "50", True)
            await joins.silence(BOB, EVERYWHERE, True)
            assert await joins.silenced([ALICE, BOB], "50") == {ALICE, BOB}
            assert await joins.silenced([ALICE, BOB], "52") == {BOB}
            await joins.silence(ALICE, "50", False)
            await joins.silence(ALICE, "52", True)
            exported = await member_export(store, ALICE, erasure_parts())
            assert [s["channel_id"] for s in exported["join_in"]["silences"]] == ["52"]
            assert [c["channel_id"] for c in exported["join_in"]["channels_opened"]] == ["50"]
            report = await forget(store, settings, ALICE, "a", "command", parts=erasure_parts())
            assert report.parts["join_silences"] == 1 and report.parts["join_channels"] == 1
            assert await joins.silenced([ALICE], "52") == set()
            assert await joins.level("50") == "normal", "the admin's switch stays; only the id is forgotten"
            row = await store.fetchone("SELECT set_by FROM join_channels WHERE channel_id = '50'")
            assert row[0] is None
            assert await joins.silenced([BOB], "50") == {BOB}, "other members' silences stay"

    asyncio.run(scenario())


def test_join_settings_refuse_an_unknown_level(doppel_home: object) -> None:
    from core.errors import ConfigError

    env = {"DOPPEL_HOME": str(doppel_home), "DOPPEL_JOIN__DEFAULT_LEVEL": "chatty"}
    with pytest.raises(ConfigError, match="default_level must be one of quiet, normal, lively"):
        Settings.load(env=env)
    assert Settings.load(env={**env, "DOPPEL_JOIN__DEFAULT_LEVEL": "lively"}).join.default_level == "lively"
