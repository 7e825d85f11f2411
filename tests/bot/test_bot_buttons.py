"""Issue 12 (3): every button the bot ever sent answers after a restart; unknown ones get an ephemeral answer."""

from __future__ import annotations

import asyncio
from typing import Any

ALICE, ADMIN = 111, 333


def _ids(payload: dict[str, Any]) -> list[str]:
    body = payload.get("data") if isinstance(payload.get("data"), dict) else payload
    return [c["custom_id"] for row in body.get("components") or [] for c in row["components"]]


def test_setup_switch_works_after_a_restart(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.command("doppel setup", ADMIN, perms=h.ADMIN)
            posted = [c for c in h.responses() if c.payload and c.payload.get("components")][-1]
            on_id, off_id = _ids(posted.payload)
            mid = posted.response["id"]
            await h.click(on_id, ADMIN, perms=h.ADMIN, ephemeral=True, mid=mid)
            assert (await services.guild_config(str(h.GUILD))).recording
        # A new client on the same database, as after a restart (also long past the old 600 s view timeout):
        # the message's "Turn recording off" still turns recording off, and the press is answered.
        async with bot_world() as (h2, services2):
            await h2.click(off_id, ADMIN, perms=h2.ADMIN, ephemeral=True, mid=mid)
            assert not (await services2.guild_config(str(h2.GUILD))).recording
            assert h2.first_response_type() == 6  # acknowledged (deferred update), then the message is edited
            edit = h2.responses()[-1]
            assert edit.method == "PATCH" and "Recording: **off**" in edit.payload["content"]
            # A member without Manage Server pressing it gets an answer too, and nothing changes.
            h2.fake.calls.clear()
            await h2.click(on_id, ALICE, ephemeral=True, mid=mid)
            first = h2.responses()[0].payload
            assert (
                first["type"] == 4
                and first["data"]["flags"] == 64
                and "Manage Server" in first["data"]["content"]
            )
            assert not (await services2.guild_config(str(h2.GUILD))).recording

    asyncio.run(scenario())


def test_forget_confirm_and_cancel_work_after_a_restart(bot_world: Any) -> None:
    from data.records import Message

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await services.store.messages.add_many(
                [Message("1", "1000", "2000", "general", str(ALICE), "alice", 1.0, "hi")]
            )
            await h.command("doppel forget", ALICE)
            yes, no = _ids(h.responses()[-1].payload)
        async with bot_world() as (h2, services2):  # restarted, and long past the old 120 s confirm timeout
            await h2.click(no, ALICE, ephemeral=True)
            assert "Nothing was deleted" in h2.sent_texts()[-1]
            assert await services2.store.messages.count(str(ALICE)) == 1
            await h2.click(yes, 222, ephemeral=True)  # another member cannot confirm someone else's erasure
            assert "not for you" in h2.sent_texts()[-1]
            assert await services2.store.messages.count(str(ALICE)) == 1
            await h2.click(yes, ALICE, ephemeral=True)
            assert await services2.store.messages.count(str(ALICE)) == 0
            assert await services2.consent.scopes(str(ALICE)) == set()
            assert "Your data was deleted" in h2.sent_texts()[-1]

    asyncio.run(scenario())


def test_unknown_or_expired_custom_ids_get_an_ephemeral_answer(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            for custom_id, command in (
                ("0123456789abcdef0123456789abcdef", "/doppel consent"),  # an old view's id
                ("doppel:setup:something-old", "/doppel setup"),
                ("doppel:forget:yes:not-a-member", "/doppel forget"),
                ("not-ours-at-all", "/doppel consent"),
            ):
                h.fake.calls.clear()
                await h.click(custom_id, ALICE)
                (answer,) = h.responses()
                assert answer.payload["type"] == 4 and answer.payload["data"]["flags"] == 64, custom_id
                assert (
                    "expired" in answer.payload["data"]["content"]
                    and command in answer.payload["data"]["content"]
                )
            # A routed press is answered once, by its handler only.
            h.fake.calls.clear()
            await h.click("doppel:consent:info", ALICE)
            callbacks = [c for c in h.responses() if c.path.endswith("/callback")]
            assert len(callbacks) == 1 and callbacks[0].payload["type"] == 5

    asyncio.run(scenario())


def test_every_view_the_bot_registers_is_persistent(bot_world: Any) -> None:
    """No registered view can time out, so nothing the bot sent goes dead while it runs."""

    async def scenario() -> None:
        async with bot_world() as (h, services):
            views = h.bot.persistent_views
            assert {type(v).__name__ for v in views} >= {"ConsentPanel", "SetupView"}
            assert all(v.timeout is None for v in views)

    asyncio.run(scenario())


def test_commands_are_turned_away_once_shutdown_began(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            h.bot.draining = True
            await h.command("doppel consent", ALICE)
            first = h.responses()[0].payload
            assert (
                first["type"] == 4
                and first["data"]["flags"] == 64
                and "restarting" in first["data"]["content"]
            )

    asyncio.run(scenario())
