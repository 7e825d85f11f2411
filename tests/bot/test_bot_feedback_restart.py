"""Persona replies are kept in the store: 👍/👎 and replies to them work after a restart; erasure reaches them and the engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

ALICE, BOB, CAROL = 111, 222, 444


def _react(h: Any, uid: int, message_id: str, emoji: str) -> None:
    h.state.parse_message_reaction_add(
        {
            "user_id": str(uid),
            "channel_id": str(h.TEXT),
            "message_id": message_id,
            "guild_id": str(h.GUILD),
            "emoji": {"id": None, "name": emoji},
            "type": 0,
            "burst": False,
        }
    )


async def _chat(h: Any, services: Any, text: str) -> str:
    """Alice (train + chat, trained persona) is asked something by Bob; returns the persona reply's message id."""
    await h.click("doppel:consent:train", ALICE)
    await h.click("doppel:consent:chat", ALICE)
    await h.active_adapter(services, ALICE)
    services.engine.enqueue(["sure, ", "see you there"])
    await h.command("persona chat", BOB, member=(6, str(ALICE)), message=text, resolved=h.resolved(ALICE))
    hooks = [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/") and c.response]
    return str(hooks[0].response["id"])


def test_feedback_on_a_reply_sent_before_a_restart_is_recorded_once(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            reply_id = await _chat(h, services, "pizza tonight?")
            stored = await services.store.persona_replies.get(reply_id)
            assert (
                stored["persona_member_id"] == str(ALICE)
                and stored["payload"]["text"] == "sure, see you there"
            )
            raw = await services.store.fetchone(
                "SELECT payload FROM persona_replies WHERE message_id = ?", (reply_id,)
            )
            assert b"pizza" not in raw[0] and b"see you there" not in raw[0]  # sealed at rest
        # A new client on the same DOPPEL_HOME: nothing in memory knows the reply.
        async with bot_world() as (h, services):
            assert h.bot.chat.replies == {}
            _react(h, BOB, reply_id, "👎")
            _react(h, CAROL, reply_id, "👍")
            _react(h, CAROL, reply_id, "🎉")  # not a feedback emoji
            _react(h, CAROL, "123456789", "👍")  # not a persona reply
            await h.settle()
            rows = await services.store.feedback.for_persona(str(ALICE))
            assert sorted((r["rater_id"], r["value"]) for r in rows) == [(str(BOB), -1), (str(CAROL), 1)]
            assert all(r["message_id"] == reply_id and r["adapter_id"] == f"a{ALICE}" for r in rows)
            assert rows[0]["reply"] == "sure, see you there"
            # Bob never opted in: his question is not kept anywhere, not even as the feedback's context.
            prompt = json.loads(rows[0]["prompt"])
            assert all("pizza" not in m["content"] for m in prompt)
            kept = await services.store.persona_replies.get(reply_id)
            assert str(BOB) not in kept["context_members"]
            assert all("pizza" not in json.dumps(v) for v in kept["payload"].values())
        # After yet another restart the same rater cannot rate the same reply twice.
        async with bot_world() as (h, services):
            _react(h, BOB, reply_id, "👍")
            await h.settle()
            assert len(await services.store.feedback.for_persona(str(ALICE))) == 2

    asyncio.run(scenario())


def test_reply_to_an_old_persona_message_after_a_restart_gets_an_answer(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            reply_id = await _chat(h, services, "pizza tonight?")
        async with bot_world() as (h, services):
            answer = h.fake.http_request

            async def discord_api(route: Any, **kwargs: Any) -> Any:
                # After a restart the member cache is empty: the bot fetches the persona's member from Discord.
                if route.method == "GET" and route.path.endswith("/members/{member_id}"):
                    h.fake.record(route.method, route.url, None)
                    return h.member(ALICE, "user111")
                return await answer(route, **kwargs)

            h.bot.http.request = discord_api
            await services.update_guild(str(h.GUILD), persona_channels=[str(h.TEXT)])
            services.engine.enqueue(["at eight"])
            await h.say(BOB, "what time?", reference=reply_id)
            assert len(services.engine.requests) == 1
            persona, context, _ = services.engine.requests[0]
            assert persona.member_id == str(ALICE)
            assert (context[-1].author_id, context[-1].text) == (str(BOB), "what time?")
            assert any(c.path.endswith(f"/members/{ALICE}") for c in h.fake.calls)

    asyncio.run(scenario())


def test_erasure_reaches_kept_replies_of_the_persona_and_of_those_quoted(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", BOB)  # Bob opted in, so his question may be kept as context
            reply_id = await _chat(h, services, "pizza tonight?")
            assert await services.store.persona_replies.count() == 1
            # Bob asked the question: his words are in the kept context, so his erasure removes the row.
            await services.forget(str(BOB), actor=str(BOB))
            assert await services.store.persona_replies.get(reply_id) is None
            h.bot.chat.replies.clear()
            services.engine.enqueue(["ok"])
            await h.command(
                "persona chat",
                CAROL,
                member=(6, str(ALICE)),
                message="hi",
                cid=h.OTHER,
                resolved=h.resolved(ALICE),
            )  # another channel: the first one is cooling down
            assert await services.store.persona_replies.count(str(ALICE)) == 1
            await services.forget(str(ALICE), actor=str(ALICE))
            assert await services.store.persona_replies.count() == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_forget_and_opt_out_clear_the_engine_caches(bot_world: Any) -> None:
    from core.chatformat import Utterance
    from data.records import Message
    from inference.engine import Engine
    from inference.retrieval import Retriever

    async def scenario() -> None:
        async with bot_world() as (h, services):
            retriever = Retriever(services.store, services.settings)
            engine = Engine(services.settings, retriever=retriever)
            services.engine = engine
            for uid in (ALICE, BOB):
                await h.click("doppel:consent:train", uid)
                await services.store.messages.add_many(
                    [
                        Message(
                            f"{uid}{i}",
                            str(h.GUILD),
                            str(h.TEXT),
                            "general",
                            str(uid),
                            f"user{uid}",
                            10.0 + i,
                            f"message {i} of {uid} about pizza and films",
                        )
                        for i in range(3)
                    ]
                )
                found = await retriever.examples(str(uid), [Utterance("9", "x", "pizza?")], 2)
                assert len(found) == 2
            engine.states.put((), [1, 2, 3], b"kv", 3)
            assert set(retriever._indexes) == {str(ALICE), str(BOB)} and len(engine.states) == 1
            await h.click("doppel:consent:optout", ALICE)  # revoking train erases content: the caches follow
            assert set(retriever._indexes) == {str(BOB)} and len(engine.states) == 0
            await h.command("doppel forget", BOB)
            confirm = h.responses()[-1].payload["data"]
            await h.click(confirm["components"][0]["components"][0]["custom_id"], BOB, ephemeral=True)
            assert "Your data was deleted" in h.sent_texts()[-1]
            assert retriever._indexes == {}

    asyncio.run(scenario())


def test_services_open_gives_the_engine_a_retriever(settings: Any) -> None:
    from bot.services import Services
    from doppel.erasure import erasure_parts
    from inference.retrieval import Retriever

    async def scenario() -> None:
        services = await Services.open(settings, erasure_parts(), with_supervisor=False)
        try:
            assert isinstance(services.engine.retriever, Retriever)
            assert services.engine.retriever.store is services.store
        finally:
            await services.close()

    asyncio.run(scenario())
