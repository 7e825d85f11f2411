"""Bounded memory and message size where the community's size enters: 1,500 consenting members in real SQLite."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from tests.helpers.rows import seed_adapter

MEMBERS = 1500
PER_MEMBER = 3


async def _community(services: Any) -> list[str]:
    """1,500 members with train + chat consent and a few messages each; every other one has an active persona."""
    from data.records import Member, Message

    ids = [str(10_000 + i) for i in range(MEMBERS)]
    await services.consent.grant(ids, "train,chat", actor="admin", channel="cli")
    for i, mid in enumerate(ids):
        await services.store.members.upsert(
            Member(mid, f"member{i}", f"Member number {i} with a long display name")
        )
    t0 = time.time() - 86_400
    messages = [
        Message(f"{mid}{k}", "1000", "2000", "general", mid, f"member{i}", t0 + i + k / 10, f"message {k}")
        for i, mid in enumerate(ids)
        for k in range(PER_MEMBER)
    ]
    await services.store.messages.add_many(messages)
    for i, mid in enumerate(ids[::2]):
        await seed_adapter(
            services.store,
            id=f"a{mid}",
            member_id=mid,
            base_model="smollm2-135m",
            version=1,
            status="active",
            path="/nonexistent",
            created_at=1.0 + i,
        )
    return ids


def test_lists_stay_bounded_for_a_large_community(bot_world: Any) -> None:
    from bot.persona_commands import LIST_LIMIT
    from bot.uploads import PendingUploads

    async def scenario() -> None:
        async with bot_world() as (h, services):
            training = dataclasses.replace(services.settings.training, min_examples=PER_MEMBER)
            services.settings = dataclasses.replace(services.settings, training=training)
            ids = await _community(services)

            assert len(await services.trainable_members(limit=25)) == 25
            assert await services.trainable_count() == MEMBERS
            assert await services.trainable_count(untrained=True) == MEMBERS // 2
            assert (
                len(await services.registry.active_personas(limit=25)) == 25
                and await services.registry.count_personas() == MEMBERS // 2
            )
            assert (
                len(await services.store.members.display_names(ids)) == MEMBERS
            )  # batched: more ids than SQLite's 999 limit

            h.fake.calls.clear()
            await h.command("persona list", 111)
            text = h.sent_texts()[-1]
            assert len(text) <= 2000
            assert sum(1 for line in text.splitlines() if line.startswith("• ")) <= 2 * LIST_LIMIT
            assert f"…and {MEMBERS // 2 - LIST_LIMIT} more" in text  # both sections say how many are left out
            assert text.count("more") == 2
            # The newest personas come first; members with a persona are not listed again as ready to train.
            assert "Member number 1498" in text.split("**Ready to train**")[0]

            # Waiting uploads are bounded in bytes, whatever the number of members uploading at once.
            from bot.services import OwnExport

            uploads = PendingUploads(max_bytes=8 * 1024 * 1024)
            for mid in ids:
                uploads.put(OwnExport(mid, b"x" * 100_000, 10, 10, "general"))
            assert uploads.held_bytes() <= 8 * 1024 * 1024 and len(uploads) <= 84

    asyncio.run(scenario())


def test_feedback_dedup_memory_is_bounded(bot_world: Any) -> None:
    from bot.chat import MAX_REMEMBERED

    async def scenario() -> None:
        async with bot_world() as (h, services):
            chat = h.bot.chat
            for i in range(MAX_REMEMBERED * 2):
                chat._rated[(i, i)] = None
            # One more real reaction path trims the map back to its bound.
            import discord

            payload = discord.RawReactionActionEvent(
                {
                    "user_id": "5",
                    "channel_id": str(h.TEXT),
                    "message_id": "77",
                    "guild_id": str(h.GUILD),
                    "emoji": {"id": None, "name": "👍"},
                    "type": 0,
                    "burst": False,
                },
                discord.PartialEmoji(name="👍"),
                "REACTION_ADD",
            )
            from bot.chat import PersonaReply

            chat.remember(
                77, PersonaReply("111", "Alice", None, str(h.GUILD), str(h.TEXT), "general", (), "hi")
            )
            await chat.on_reaction(payload)
            assert len(chat._rated) <= MAX_REMEMBERED

    asyncio.run(scenario())
