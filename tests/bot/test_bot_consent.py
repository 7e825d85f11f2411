"""Consent buttons and commands, through discord.py's own interaction parsing, against the real store."""

from __future__ import annotations

import asyncio
from typing import Any

ALICE, BOB = 111, 222


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_consent_command_defers_then_shows_state_and_buttons(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.command("doppel consent", ALICE)
            assert h.first_response_type() == 5  # deferred before reading the store
            assert h.responses()[0].payload["data"]["flags"] == 64  # ephemeral
            followup = h.responses()[1].payload
            assert "train" in followup["content"] and "Nothing of yours is recorded" in followup["content"]
            ids = [c["custom_id"] for row in followup["components"] for c in row["components"]]
            assert "doppel:consent:train" in ids and "doppel:consent:forget" in ids

    run(scenario())


def test_panel_buttons_grant_and_revoke_with_audit(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.click("doppel:consent:chat", ALICE)
            assert await services.consent.scopes(str(ALICE)) == {"train", "chat"}
            assert await services.consent.scopes(str(BOB)) == set()
            audit = await services.consent.audit(str(ALICE))
            assert [(a["action"], a["scope"], a["channel"]) for a in audit] == [
                ("grant", "train", "button"),
                ("grant", "chat", "button"),
            ]
            await h.click("doppel:consent:optout", ALICE)
            assert await services.consent.scopes(str(ALICE)) == set()
            assert "❌ **train**" in h.sent_texts()[-1]

    run(scenario())


def test_panel_buttons_survive_a_restart(bot_world: Any) -> None:
    """A fresh client (as after a restart) routes the fixed custom ids of an old panel message."""

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.command("doppel panel", BOB, perms=h.ADMIN)
            posted = h.responses()[0].payload
            assert posted["type"] == 4 and "Opt in to training" in str(posted["data"]["components"])
        async with bot_world() as (h2, services2):  # new client, same database
            await h2.click("doppel:consent:train", ALICE)
            assert "train" in await services2.consent.scopes(str(ALICE))
            assert h2.first_response_type() == 5

    run(scenario())


def test_panel_is_for_admins_only(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.command("doppel panel", ALICE)
            reply = h.responses()[0].payload
            assert reply["type"] == 4 and reply["data"]["flags"] == 64
            assert "Manage Server" in reply["data"]["content"]

    run(scenario())


def test_forget_needs_confirmation_then_reports(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await services.serve_as_place()  # as `Services.open` does for a bot with an engine
            await h.click("doppel:consent:train", ALICE)
            from data.records import Message

            await services.store.messages.add_many(
                [Message("1", "1000", "2000", "general", str(ALICE), "alice", 1.0, "hi")]
            )
            assert await services.store.messages.count(str(ALICE)) == 1
            await h.command("doppel forget", ALICE)
            confirm = h.responses()[-1].payload["data"]
            assert confirm["flags"] == 64 and "cannot be undone" in confirm["content"]
            assert await services.store.messages.count(str(ALICE)) == 1  # nothing happens before the confirm
            view_ids = [c["custom_id"] for row in confirm["components"] for c in row["components"]]
            await h.click(view_ids[0], ALICE, ephemeral=True)
            assert await services.store.messages.count(str(ALICE)) == 0
            assert await services.consent.scopes(str(ALICE)) == set()
            said = h.sent_texts()[-1]
            assert "Your data was deleted" in said
            # The bot's own engine is a serving place and says what it did, as the CLI's forget does.
            assert "the bot's persona engine" in said and "held nothing of the member" in said, said

    run(scenario())


def test_confirm_button_ignores_other_members(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.command("doppel forget", ALICE)
            confirm = h.responses()[-1].payload["data"]
            first = confirm["components"][0]["components"][0]["custom_id"]
            await h.click(first, BOB, ephemeral=True)
            assert "not for you" in h.sent_texts()[-1]
            assert await services.consent.scopes(str(ALICE)) == {"train"}

    run(scenario())
