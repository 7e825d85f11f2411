"""The recording gate and the mirror of edits/deletions, asserted on the real SQLite store."""

from __future__ import annotations

import asyncio
from typing import Any

ALICE, BOB, ADMIN = 111, 222, 333


async def _enable(h: Any, services: Any, channels: tuple[int, ...]) -> None:
    await services.update_guild(
        str(h.GUILD),
        recording=True,
        acknowledged_by=str(ADMIN),
        acknowledged_at=1.0,
        allowed_channels=[str(c) for c in channels],
    )


def test_only_consenting_members_in_allowed_channels_are_stored(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            before = await h.say(ALICE, "said before recording was on")
            await _enable(h, services, (h.TEXT,))
            kept = await h.say(ALICE, "hello from alice")
            await h.say(BOB, "bob never opted in")
            await h.say(ALICE, "wrong channel", cid=h.OTHER)
            await h.say(ALICE, "a bot account", bot=True)
            await h.say(ALICE, "via a webhook", webhook=True)
            stored = await services.store.messages.for_member(str(ALICE))
            assert [m.id for m in stored] == [kept]
            assert stored[0].content == "hello from alice" and stored[0].source == "discord"
            assert await services.store.messages.count(str(BOB)) == 0
            assert await services.store.messages.get(before) is None
            row = await services.store.fetchone(
                "SELECT COUNT(*) FROM messages WHERE author_id = ?", (str(BOB),)
            )
            assert row[0] == 0

    asyncio.run(scenario())


def test_recording_needs_the_admin_acknowledgement(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await services.update_guild(str(h.GUILD), recording=True, allowed_channels=[str(h.TEXT)])
            await h.say(ALICE, "not acknowledged yet")
            assert await services.store.messages.count(str(ALICE)) == 0
            await h.command("doppel setup", ALICE)  # not an admin
            assert "Manage Server" in h.sent_texts()[-1]
            await h.command("doppel setup", ADMIN, perms=h.ADMIN)
            notice = h.sent_texts()[-1]
            assert "Developer Policy" in notice and "Recording: **off**" in notice
            followup = [c for c in h.responses() if c.payload and c.payload.get("components")][-1]
            ack_id = followup.payload["components"][0]["components"][0]["custom_id"]
            # The acknowledge button of that (message-bound) view, pressed by the admin.
            await h.click(ack_id, ADMIN, perms=h.ADMIN, ephemeral=True, mid=followup.response["id"])
            config = await services.guild_config(str(h.GUILD))
            assert config.recording and config.acknowledged_by == str(ADMIN)
            await h.say(ALICE, "now it counts")
            assert await services.store.messages.count(str(ALICE)) == 1

    asyncio.run(scenario())


def test_edits_and_deletes_are_mirrored_including_uncached(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await _enable(h, services, (h.TEXT,))
            first = await h.say(ALICE, "first version")
            second = await h.say(ALICE, "to be deleted")
            third = await h.say(ALICE, "bulk deleted")
            h.state._messages.clear()  # as after a restart: raw events only
            edit = h.fake.message("second version", str(h.TEXT), author=h.user(ALICE, "alice"), mid=first)
            edit.update(guild_id=str(h.GUILD), edited_timestamp="2024-05-01T12:05:00+00:00")
            h.state.parse_message_update(edit)
            h.state.parse_message_delete({"id": second, "channel_id": str(h.TEXT), "guild_id": str(h.GUILD)})
            h.state.parse_message_delete_bulk(
                {"ids": [third], "channel_id": str(h.TEXT), "guild_id": str(h.GUILD)}
            )
            await h.settle()
            edited = await services.store.messages.get(first)
            assert edited is not None and edited.content == "second version" and edited.edited_at
            assert await services.store.messages.get(second) is None
            assert await services.store.messages.get(third) is None

    asyncio.run(scenario())


def test_backfill_reads_history_for_consenting_members_only(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await _enable(h, services, (h.TEXT,))
            history = []
            for i in range(130):
                author = ALICE if i % 2 == 0 else BOB
                msg = h.fake.message(f"old message {i}", str(h.TEXT), author=h.user(author, f"user{author}"))
                msg["guild_id"] = str(h.GUILD)
                history.append(msg)
            h.fake.history[str(h.TEXT)] = history
            resolved = {
                "channels": {
                    str(h.TEXT): {"id": str(h.TEXT), "type": 0, "name": "general", "permissions": h.ADMIN}
                }
            }
            await h.command("doppel backfill", ALICE, channel=(7, str(h.TEXT)), resolved=resolved)
            assert "Manage Server" in h.sent_texts()[-1]
            await h.command(
                "doppel backfill", ADMIN, perms=h.ADMIN, channel=(7, str(h.TEXT)), resolved=resolved
            )
            assert await services.store.messages.count(str(ALICE)) == 65
            assert await services.store.messages.count(str(BOB)) == 0
            assert "130 read, 65 stored" in h.sent_texts()[-1]

    asyncio.run(scenario())
