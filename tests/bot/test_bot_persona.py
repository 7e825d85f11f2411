"""Persona chat through the webhook (no pings, throttled stream, rate limits, feedback) and /persona train rules."""

from __future__ import annotations

import asyncio
from typing import Any

ALICE, BOB, ADMIN = 111, 222, 333


def test_persona_speaks_through_webhook_without_mentions(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.click("doppel:consent:chat", ALICE)
            gguf = str(await h.active_adapter(services, ALICE))
            services.engine.enqueue(["Hey @everyone", " and <@222>,", " see @here!"])
            h.fake.calls.clear()
            await h.command(
                "persona chat", BOB, member=(6, str(ALICE)), message="hi there", resolved=h.resolved(ALICE)
            )
            assert h.first_response_type() == 5  # deferred before generating
            hooks = [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/")]
            assert hooks, "the reply goes out through the channel webhook"
            assert hooks[0].payload["username"] == "User111 (AI)"
            for call in hooks:
                assert call.payload["allowed_mentions"] == {"parse": []}
            final = hooks[-1].payload["content"]
            assert "@everyone" not in final and "@here" not in final and "<@222>" not in final
            assert final.replace("\u200b", "") == "Hey @everyone and <@222>, see @here!"
            persona, context, _ = services.engine.requests[0]
            assert persona.mode == "adapter" and persona.adapters == ((gguf, 1.0),)
            assert (context[-1].author_id, context[-1].text) == (str(BOB), "hi there")
            # 👍 on the persona reply is recorded as feedback for that persona, once per rater.
            reply_id = int(hooks[0].response["id"])
            reaction = {
                "user_id": str(BOB),
                "channel_id": str(h.TEXT),
                "message_id": str(reply_id),
                "guild_id": str(h.GUILD),
                "emoji": {"id": None, "name": "👍"},
                "type": 0,
                "burst": False,
            }
            h.state.parse_message_reaction_add(reaction)
            h.state.parse_message_reaction_add(dict(reaction))
            await h.settle()
            rows = await services.store.feedback.for_persona(str(ALICE))
            assert [(r["rater_id"], r["value"]) for r in rows] == [(str(BOB), 1)]

    asyncio.run(scenario())


def test_persona_chat_requires_chat_consent_and_rate_limits(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.active_adapter(services, ALICE)
            h.fake.calls.clear()
            await h.command(
                "persona chat", BOB, member=(6, str(ALICE)), message="hi", resolved=h.resolved(ALICE)
            )
            assert "has not allowed chat" in h.sent_texts()[-1]
            # Issue 12 (2): the refusal is the interaction's first response and it is ephemeral, not a followup
            # of a public acknowledgement (which Discord would show to the whole channel).
            first = h.responses()[0].payload
            assert first["type"] == 4 and first["data"]["flags"] == 64
            assert not [c for c in h.fake.calls if "/webhooks/7777" in c.path or c.path.endswith("/webhooks")]
            assert services.engine.requests == []
            await h.click("doppel:consent:chat", ALICE)
            await h.command(
                "persona chat", ADMIN, member=(6, str(ALICE)), message="hi", resolved=h.resolved(ALICE)
            )
            await h.command(
                "persona chat", ADMIN, member=(6, str(ALICE)), message="again", resolved=h.resolved(ALICE)
            )
            assert "slow down" in h.sent_texts()[-1]
            assert len(services.engine.requests) == 1

    asyncio.run(scenario())


def test_reply_to_persona_in_persona_channel_gets_an_answer(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.click("doppel:consent:chat", ALICE)
            await h.active_adapter(services, ALICE)
            await services.update_guild(str(h.GUILD), persona_channels=[str(h.PERSONA)])
            await h.say(
                BOB,
                "@doppel what does alice think?",
                cid=h.PERSONA,
                mentions=[h.user(h.APP, "doppel", True), h.user(ALICE, "user111")],
            )
            assert len(services.engine.requests) == 1
            await h.say(
                BOB,
                "@doppel same question elsewhere",
                cid=h.OTHER,
                mentions=[h.user(h.APP, "doppel", True), h.user(ALICE, "user111")],
            )
            assert len(services.engine.requests) == 1  # not a persona channel

    asyncio.run(scenario())


def test_persona_train_permissions_consent_and_defer_order(bot_world: Any) -> None:
    from bot.persona_commands import PRESET_CHOICES, PersonaCommands
    from jobs.supervisor import Supervisor
    from jobspec.config import PRESET_TIMES, PRESETS

    # The presets are offered as declared, each with its stated time.
    assert [c.value for c in PRESET_CHOICES] == list(PRESETS)
    assert all(c.name == f"{c.value}: {PRESET_TIMES[c.value]}" for c in PRESET_CHOICES), (
        "whole, within 100 chars"
    )

    async def scenario() -> None:
        async with bot_world() as (h, services):

            class Recorded(Supervisor):
                async def submit(self, member_id: Any, **kw: Any) -> Any:
                    h.fake.events.append("submit")
                    return await super().submit(member_id, **kw)

            services.supervisor = Recorded(services.store, services.settings)
            # Another member may not train Alice's persona; refused at once, before any deferral.
            await h.command("persona train", BOB, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert (
                h.first_response_type() == 4 and "only the member themself or an admin" in h.sent_texts()[-1]
            )
            # Alice herself, without train consent: refused, and only she sees it (issue 12 (2)).
            h.fake.calls.clear()
            await h.command("persona train", ALICE, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert h.first_response_type() == 5 and "has not opted in" in h.sent_texts()[-1]
            assert h.responses()[0].payload["data"]["flags"] == 64, "acknowledged ephemerally"
            # An admin training someone who did not opt in is told so privately as well.
            h.fake.calls.clear()
            await h.command(
                "persona train", ADMIN, perms=h.ADMIN, member=(6, str(ALICE)), resolved=h.resolved(ALICE)
            )
            assert (
                "has not opted in" in h.sent_texts()[-1] and h.responses()[0].payload["data"]["flags"] == 64
            )
            assert "submit" not in h.fake.events
            # With consent: deferred first, then submitted; a progress message with a cancel button follows.
            await h.click("doppel:consent:train", ALICE)
            h.fake.events.clear()
            await h.command(
                "persona train",
                ADMIN,
                perms=h.ADMIN,
                member=(6, str(ALICE)),
                preset=(3, "quick"),
                resolved=h.resolved(ALICE),
            )
            first_callback = next(i for i, e in enumerate(h.fake.events) if "/callback" in e)
            assert first_callback < h.fake.events.index("submit")
            (job,) = await services.jobs.recent(member_id=str(ALICE))
            assert job.requested_by == str(ADMIN) and job.source == "discord"
            assert (
                job.config["preset"] == "quick"
                and job.config["token_budget"] == PRESETS["quick"]["token_budget"]
            )
            progress = [
                c for c in h.responses() if c.payload and "Training User111" in str(c.payload.get("content"))
            ]
            assert progress and f"doppel:job:cancel:{job.id}" in str(progress[-1].payload["components"])
            # The progress message is the second followup (public); the first one, private, says it was queued.
            followups = [
                c for c in h.responses() if c.method == "POST" and c.path.startswith(f"/webhooks/{h.APP}/tok")
            ]
            assert "queued" in followups[-2].payload["content"] and followups[-2].payload["flags"] == 64
            assert followups[-1] is progress[-1] and not followups[-1].payload.get("flags")
            # The cancel button (a dynamic item: works after restarts too) refuses bystanders, accepts the member.
            await h.click(f"doppel:job:cancel:{job.id}", BOB)
            assert "only the member" in h.sent_texts()[-1]
            await h.click(f"doppel:job:cancel:{job.id}", ALICE)
            assert (await services.jobs.get(job.id)).status == "cancelled"
            group = h.bot.tree.get_command("persona")
            assert isinstance(group, PersonaCommands)
            await asyncio.wait_for(asyncio.gather(*group._watchers.values()), timeout=10)
            assert "cancelled" in h.sent_texts()[-1]

    asyncio.run(scenario())


def test_a_refused_mention_never_says_in_public_why(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await services.update_guild(str(h.GUILD), persona_channels=[str(h.PERSONA)])
            before = len(h.fake.calls)
            await h.say(
                BOB,
                "@doppel what does alice think?",
                cid=h.PERSONA,
                mentions=[h.user(h.APP, "doppel", True), h.user(ALICE, "user111")],
            )
            new = h.fake.calls[before:]
            public = [c for c in new if c.method == "POST" and f"/channels/{h.PERSONA}/messages" in c.path]
            assert public == [], "nothing is posted in the channel"
            assert any(c.method == "PUT" and "/reactions/" in c.path for c in new), (
                "a neutral reaction instead"
            )
            dms = [c for c in new if c.method == "POST" and "/channels/5555/messages" in c.path]
            assert dms and "has not allowed chat" in dms[0].payload["content"], "the reason goes to the asker"
            assert services.engine.requests == []
            # With DMs closed the reaction is the whole answer, and still nothing is said in public.
            h.fake.dm_forbidden = True
            before = len(h.fake.calls)
            await h.say(
                BOB,
                "@doppel and now?",
                cid=h.PERSONA,
                mentions=[h.user(h.APP, "doppel", True), h.user(ALICE, "user111")],
            )
            assert not [
                c
                for c in h.fake.calls[before:]
                if f"/channels/{h.PERSONA}/messages" in c.path and c.method == "POST"
            ]

    asyncio.run(scenario())


def test_the_default_persona_is_the_hybrid_and_each_reply_records_its_mode(bot_world: Any) -> None:
    """Issue 22: the bot serves what measured best (adapter + the member's messages) and says so."""
    from data.records import Message

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.click("doppel:consent:chat", ALICE)
            gguf = str(await h.active_adapter(services, ALICE))
            await h.active_adapter(services, BOB)
            await h.click("doppel:consent:chat", BOB)
            assert services.settings.bot.persona_mode == "auto"
            # Alice has stored messages; Bob does not, so his persona can only be the adapter alone.
            await services.store.messages.add_many(
                [
                    Message(f"m{i}", str(h.GUILD), "c1", "general", str(ALICE), "alice", 1e9 + i, f"hi {i}")
                    for i in range(3)
                ]
            )
            services.engine.enqueue(["sure thing"])
            await h.command(
                "persona chat", ADMIN, member=(6, str(ALICE)), message="hi", resolved=h.resolved(ALICE)
            )
            services.engine.enqueue(["nah"])
            h.bot.chat.per_member.interval_s = h.bot.chat.per_channel.interval_s = 0.0  # not what this tests
            await h.command(
                "persona chat", ADMIN, member=(6, str(BOB)), message="yo", resolved=h.resolved(BOB)
            )
            (alice, _, _), (bob, _, _) = services.engine.requests
            assert alice.mode == "adapter+retrieval" and alice.adapters == ((gguf, 1.0),)
            assert bob.mode == "adapter"
            hooks = [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/") and c.response]
            kept = {
                row["persona_member_id"]: row["mode"]
                for row in [await services.store.persona_replies.get(str(c.response["id"])) for c in hooks]
                if row is not None
            }
            assert kept == {str(ALICE): "adapter+retrieval", str(BOB): "adapter"}
            assert await services.store.persona_replies.modes(str(ALICE)) == {"adapter+retrieval": 1}
            # /persona report names the server's mode and the modes its kept replies were made with.
            await h.command("persona report", ADMIN, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            report = h.sent_texts()[-1]
            assert "Served as `auto`" in report and "1 adapter+retrieval" in report, report

    asyncio.run(scenario())
