"""Personas joining in, the bot as it runs: addressed or named without a mention (while the member is away, on a
server of any size), budgets, never over their member, no chains, typing first, consent and the channel switch
checked right before each message, a failed summoned reply hiding nothing from the gate, persona conversations
capped and stoppable, and nobody pinged."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from data.records import Member, Message
from tests.bot.conftest import snowflake

ALICE, BOB, CAROL, ADMIN = 111, 222, 444, 333


@pytest.fixture
def settings(settings: Any) -> Any:
    """No waiting in tests: the member's delay and typing are capped at zero unless a test asks for them."""
    join = dataclasses.replace(settings.join, max_wait_s=0.0, max_typing_s=0.0)
    return dataclasses.replace(settings, join=join)


async def _persona(h: Any, services: Any, uid: int, name: str, topic: str, guild: str | None = None) -> None:
    """A member who opted in to everything, with a trained persona and messages of their own on `topic`."""
    for scope in ("train", "chat", "join"):
        await h.click(f"doppel:consent:{scope}", uid)
    await h.active_adapter(services, uid)
    await services.store.members.upsert(Member(str(uid), name.lower(), name))
    now = time.time()
    await services.store.messages.add_many(
        [
            Message(
                id=snowflake(),
                guild_id=guild or str(h.GUILD),
                channel_id=str(h.TEXT),
                channel_name="general",
                author_id=str(uid),
                author_name=name,
                created_at=now - 7200 + k * 120,
                content=f"my {topic} again, number {k}",
                source="live",
            )
            for k in range(40)
        ]
    )


async def _open(h: Any, level: str = "normal", cid: int | None = None) -> None:
    """An admin opens a channel with /join channel."""
    cid = cid or h.TEXT
    resolved = {
        "channels": {str(cid): {"id": str(cid), "type": 0, "name": "general", "permissions": h.ADMIN}}
    }
    await h.command(
        "join channel", ADMIN, perms=h.ADMIN, channel=(7, str(cid)), level=(3, level), resolved=resolved
    )


def _hooks(h: Any) -> list[Any]:
    return [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/") and c.method == "POST"]


def _persona_posts(h: Any) -> list[str]:
    return [c.payload["username"] for c in _hooks(h)]


def test_persona_joins_when_addressed_without_a_mention_typing_first_and_pings_nobody(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await h.say(BOB, "alice, what do you say about the roses?")
            assert services.engine.requests == [], "the channel is not open to personas yet"
            await _open(h)
            assert await services.store.joins.level(str(h.TEXT)) == "normal"
            h.fake.events.clear()
            services.engine.enqueue(["Roses need sun, <@222> @everyone"])
            await h.say(BOB, "alice, what do you say about the roses?")
            assert len(services.engine.requests) == 1
            persona, context, _ = services.engine.requests[0]
            assert persona.member_id == str(ALICE) and context[-1].text.startswith("alice, what do")
            typing = next(i for i, e in enumerate(h.fake.events) if e.endswith("/typing"))
            posted = next(i for i, e in enumerate(h.fake.events) if e.startswith("http POST /webhooks/7777/"))
            assert typing < posted, "the typing indicator comes before the message"
            for call in h.fake.calls:
                if isinstance(call.payload, dict) and "allowed_mentions" in call.payload:
                    assert call.payload["allowed_mentions"] == {"parse": []}
            final = [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/")][-1].payload["content"]
            assert "<@222>" not in final and "@everyone" not in final
            await h.say(BOB, "nice weather today")
            assert len(services.engine.requests) == 1, "not named, nothing on her topic: she stays out"
            # Consent is per member: someone whose messages are all on another server is not this server's persona.
            await _persona(h, services, CAROL, "Carol", "engines", guild="999")
            await h.say(BOB, "carol, what do you think of engines?")
            assert len(services.engine.requests) == 1

    asyncio.run(scenario())


def test_budget_quiet_member_and_no_chains(bot_world: Any) -> None:
    from inference.joingate import LEVELS

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await _open(h)
            for k in range(LEVELS["normal"].persona_per_hour + 2):
                await h.say(BOB, f"alice, what about the roses? ({k})")
            assert len(services.engine.requests) == LEVELS["normal"].persona_per_hour, "within her budget"
            # A persona's (webhook) message naming another persona never makes that one answer: no chains.
            before = len(services.engine.requests)
            await h.say(ALICE, "carol, what do you think of engines?", webhook=True)
            await h.say(9999, "carol, what do you think of engines?", bot=True)
            assert len(services.engine.requests) == before
            # A human addressing Carol does.
            await h.say(BOB, "carol, what do you think of engines?")
            assert len(services.engine.requests) == before + 1
            assert services.engine.requests[-1][0].member_id == str(CAROL)

    asyncio.run(scenario())


def test_says_nothing_while_its_member_is_active(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _open(h, "lively")
            await h.say(ALICE, "I'm here myself")
            await h.say(BOB, "alice, what about the roses?")
            assert services.engine.requests == [], (
                "her person is in the channel: the persona does not talk over her"
            )
            # Elsewhere she was not writing: her persona may join there (once that channel is open too).
            await _open(h, "lively", h.OTHER)
            await h.say(BOB, "alice, what about the roses?", cid=h.OTHER)
            assert len(services.engine.requests) == 1
            # Silenced by the member herself (everywhere): nothing more.
            await h.command("join silence", ALICE, where=(3, "all"))
            await h.say(BOB, "alice, would you like the roses again?", cid=h.OTHER)
            assert len(services.engine.requests) == 1

    asyncio.run(scenario())


def _quick_absence(h: Any, services: Any, quiet_s: float) -> None:
    """The member counts as away `quiet_s` after her last message (5 minutes in production)."""
    services.settings = dataclasses.replace(
        services.settings, join=dataclasses.replace(services.settings.join, member_quiet_s=quiet_s)
    )
    h.bot.join.settings = services.settings.join


def test_addressed_while_away_is_answered_and_not_while_present(bot_world: Any) -> None:
    """Issue 41: the gate asks whether she would answer were she here, and asks it only while she is away."""

    async def scenario() -> None:
        async with bot_world() as (h, services):
            _quick_absence(h, services, 0.3)
            await _persona(h, services, ALICE, "Alice", "risotto")
            await _open(h, "quiet")  # the default level, the one that speaks least
            question = "Alice, what are you cooking this weekend? any risotto plans?"
            await h.say(ALICE, "brb, the oven")
            await h.say(BOB, question)
            assert services.engine.requests == [], "she is here: her person answers, not her persona"
            await asyncio.sleep(0.4)  # she is away now
            await h.say(BOB, question)
            assert [r[0].member_id for r in services.engine.requests] == [str(ALICE)]
            assert services.engine.requests[0][1][-1].text == question

    asyncio.run(scenario())


def test_a_named_member_of_a_three_member_server_is_answered(bot_world: Any) -> None:
    """Issue 41: with fewer than five members a name another member once wrote no longer counts as a common word."""

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await _persona(h, services, 555, "Dave", "tents")
            await services.store.messages.add_many(
                [
                    Message(
                        id=snowflake(),
                        guild_id=str(h.GUILD),
                        channel_id=str(h.TEXT),
                        channel_name="general",
                        author_id="555",
                        author_name="Dave",
                        created_at=time.time() - 3000,
                        content="alice knows her roses",
                        source="live",
                    )
                ]
            )
            await _open(h, "lively")
            await h.say(BOB, "what would alice say, do roses like roses? roses!")
            assert [r[0].member_id for r in services.engine.requests] == [str(ALICE)]

    asyncio.run(scenario())


class _FailingEngine:
    """The scripted engine, except that a summoned reply fails after its first words (a server gone mid-stream)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests = engine.requests

    async def reply(self, persona: Any, context: Any, params: Any) -> Any:
        from inference.errors import ServerError

        self.requests.append((persona, list(context), params))
        yield "Half a rep"
        raise ServerError("the persona server stopped answering")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def test_a_failed_summoned_reply_answers_in_one_line_and_the_gate_still_sees_the_message(
    bot_world: Any,
) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await services.update_guild(str(h.GUILD), persona_channels=[str(h.TEXT)])
            await _open(h, "lively")
            services.engine = _FailingEngine(services.engine)
            # Alice herself summons Carol's persona, and the reply fails mid-stream.
            await h.say(
                ALICE,
                "<@9000> <@444> what do you think?",
                mentions=[h.user(h.APP, "doppel", True), h.user(CAROL, "user444")],
            )
            assert len(services.engine.requests) == 1
            posted = [c for c in _hooks(h)]
            assert len(posted) == 1, "the half reply went out"
            deleted = [
                c for c in h.fake.calls if c.method == "DELETE" and c.path.startswith("/webhooks/7777/")
            ]
            assert len(deleted) == 1, "and was taken back: no half message ending in the cursor stays"
            replies = [
                c for c in h.fake.calls if c.method == "POST" and c.path == f"/channels/{h.TEXT}/messages"
            ]
            assert len(replies) == 1
            line = replies[0].payload["content"]
            assert "\n" not in line and "could not answer" in line and "stopped answering" in line
            assert replies[0].payload["allowed_mentions"]["parse"] == []
            # The gate saw Alice write although the summoned reply raised: her persona does not talk over her.
            services.engine = services.engine.engine
            await h.say(BOB, "alice, what about the roses?")
            assert len(services.engine.requests) == 1

    asyncio.run(scenario())


def _dispatch(h: Any, uid: int, content: str, cid: int) -> None:
    """A MESSAGE_CREATE without waiting for its handlers (to act while a persona is still waiting)."""
    from tests.helpers.discord_payloads import member, user

    data = h.fake.message(content, str(cid), author=user(uid, f"user{uid}", False))
    data["guild_id"] = str(h.GUILD)
    data["member"] = {k: v for k, v in member(uid, f"user{uid}").items() if k != "user"}
    h.state.parse_message_create(data)


@pytest.mark.parametrize("how", ["revoke", "channel_off", "human_first"])
def test_a_waiting_persona_is_stopped_before_its_next_message(bot_world: Any, how: str) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.settings = dataclasses.replace(
                services.settings, join=dataclasses.replace(services.settings.join, max_wait_s=1.0)
            )
            h.bot.join.settings = services.settings.join
            await _persona(h, services, ALICE, "Alice", "roses")
            await _open(h, "lively")
            _dispatch(h, BOB, "alice, what about the roses?", h.TEXT)
            await asyncio.sleep(0.3)  # the gate chose her; she is "reading" (her delay, 1 s here)
            assert h.bot.join.pending, "a turn is waiting"
            if how == "revoke":
                await h.click("doppel:consent:join", ALICE)  # pressed again: `join` withdrawn
                assert "join" not in await services.consent.scopes(str(ALICE))
            elif how == "channel_off":
                await _open(h, "off")
            else:
                await h.say(CAROL, "I can answer that: full sun")
            await h.settle()
            assert services.engine.requests == [] and _hooks(h) == []

    asyncio.run(scenario())


def _converse(h: Any, uid: int, **options: Any) -> None:
    """Invoke /join converse without waiting for it to finish."""
    from tests.bot.conftest import snowflake as sf

    types = {int: 4, str: 3}
    opts = []
    resolved: dict[str, Any] = {"users": {}, "members": {}}
    for name, value in options.items():
        if name in ("first", "second", "third"):
            opts.append({"type": 6, "name": name, "value": str(value)})
            block = h.resolved(value)
            resolved["users"].update(block["users"])
            resolved["members"].update(block["members"])
        else:
            opts.append({"type": types[type(value)], "name": name, "value": value})
    data = {
        "id": sf(),
        "name": "join",
        "type": 1,
        "options": [{"type": 1, "name": "converse", "options": opts}],
        "resolved": resolved,
    }
    h.state.parse_interaction_create(h._interaction(2, data, uid, "0"))


def test_two_personas_converse_until_the_cap(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await _open(h)
            _converse(h, BOB, first=ALICE, second=CAROL, topic="roses and engines", turns=100)
            await h.settle()
            cap = services.settings.join.converse_max_turns
            speakers = [r[0].member_id for r in services.engine.requests]
            assert len(speakers) == cap, "asked for 100, capped by the hard maximum"
            assert all(a != b for a, b in zip(speakers, speakers[1:], strict=False)), (
                "never the same persona twice in a row"
            )
            assert set(speakers) == {str(ALICE), str(CAROL)}
            assert "ended after" in h.sent_texts()[-1]
            # Anyone may press Stop on an ended conversation: it says so.
            start = next(c for c in h.responses() if c.payload and "doppel:join:stop:" in str(c.payload))
            custom_id = str(start.payload).split("doppel:join:stop:", 1)[1].split("'", 1)[0]
            await h.click(f"doppel:join:stop:{custom_id}", BOB)
            assert "already ended" in h.sent_texts()[-1]
            for call in h.fake.calls:
                body = (
                    call.payload.get("data")
                    if isinstance(call.payload, dict) and "data" in call.payload
                    else call.payload
                )
                if isinstance(body, dict) and "allowed_mentions" in body:
                    assert body["allowed_mentions"] == {"parse": []}

    asyncio.run(scenario())


def test_stop_ends_a_conversation_and_consent_is_required(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.settings = dataclasses.replace(
                services.settings, join=dataclasses.replace(services.settings.join, max_typing_s=0.25)
            )
            h.bot.join.settings = services.settings.join
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await _open(h)
            await h.command(
                "join converse",
                BOB,
                first=(6, str(ALICE)),
                second=(6, str(BOB)),
                topic="hello",
                resolved={k: {**h.resolved(ALICE)[k], **h.resolved(BOB)[k]} for k in ("users", "members")},
            )
            assert services.engine.requests == []
            assert "has not allowed their persona" in h.sent_texts()[-1]
            await h.command("join silence", CAROL)  # in this channel
            _converse(h, BOB, first=ALICE, second=CAROL, topic="roses and engines", turns=8)
            await h.settle()
            assert services.engine.requests == [] and "silenced their persona here" in h.sent_texts()[-1]
            await h.command("join silence", CAROL, silent=False)
            _converse(h, BOB, first=ALICE, second=CAROL, topic="roses and engines", turns=8)
            await asyncio.sleep(0.6)
            (running,) = h.bot.join.conversations.values()
            await h.click(f"doppel:join:stop:{running.id}", ADMIN)
            await h.settle()
            assert 1 <= len(services.engine.requests) < 8
            assert any("Stopped by" in t for t in h.sent_texts())
            assert "stopped after" in h.sent_texts()[-1]

    asyncio.run(scenario())


# -- issue 42: the rules from durable state, checked at the moment of acting ------------------------------------------
ASK = "Alice, what are you cooking this weekend? any risotto plans?"


def test_a_restart_keeps_the_budget_and_the_presence_rule(bot_world: Any) -> None:
    from inference.joingate import LEVELS

    budget = LEVELS["normal"].persona_per_hour

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "risotto")
            await _open(h, "normal", h.OTHER)
            await _open(h, "normal")
            for k in range(budget - 1):
                await h.say(BOB, f"{ASK} ({k})", cid=h.OTHER)
            assert len(services.engine.requests) == budget - 1
            await h.say(ALICE, "back, I'm here myself")
        # The bot restarts: a new client on the same database.
        async with bot_world() as (h, services):
            await h.say(BOB, ASK)
            assert services.engine.requests == [], "she wrote just before the restart: no talking over her"
            for k in range(3):
                await h.say(BOB, f"{ASK} ({k})", cid=h.OTHER)
            assert len(services.engine.requests) == 1, (
                "one turn of her hourly budget was left, not a fresh hour"
            )

    asyncio.run(scenario())


def test_three_channels_at_once_stay_within_the_budget(bot_world: Any) -> None:
    from inference.joingate import LEVELS

    async def scenario() -> None:
        async with bot_world() as (h, services):
            _quick_absence(h, services, 0.0)
            await _persona(h, services, ALICE, "Alice", "risotto")
            for cid in (h.TEXT, h.OTHER, h.PERSONA):
                await _open(h, "quiet", cid)
            for cid in (h.TEXT, h.OTHER, h.PERSONA):
                _dispatch(h, BOB, ASK, cid)  # all three before any handler runs
            await h.settle()
            assert 1 <= len(services.engine.requests) <= LEVELS["quiet"].persona_per_hour
            assert len(_hooks(h)) == len(services.engine.requests)

    asyncio.run(scenario())


def test_converse_only_in_an_opened_channel(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "roses")
            await _persona(h, services, CAROL, "Carol", "engines")
            await services.update_guild(
                str(h.GUILD), persona_channels=[str(h.TEXT)]
            )  # a persona channel only
            _converse(h, BOB, first=ALICE, second=CAROL, topic="roses and engines", turns=4)
            await h.settle()
            assert services.engine.requests == []
            assert "`/join channel` first" in h.sent_texts()[-1]
            await _open(h)
            _converse(h, BOB, first=ALICE, second=CAROL, topic="roses and engines", turns=2)
            await h.settle()
            assert len(services.engine.requests) == 2
            # Its own budget and cooldown: another conversation right away is refused.
            _converse(h, BOB, first=ALICE, second=CAROL, topic="again", turns=2)
            await h.settle()
            assert len(services.engine.requests) == 2 and "talked enough" in h.sent_texts()[-1]

    asyncio.run(scenario())


class _SlowEngine:
    """The scripted engine, streaming slowly (so a human can speak in the middle)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests = engine.requests

    async def reply(self, persona: Any, context: Any, params: Any) -> Any:
        self.requests.append((persona, list(context), params))
        for word in ("Risotto ", "with ", "mushrooms ", "and ", "lots ", "of ", "parmesan"):
            yield word
            await asyncio.sleep(0.1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def test_a_human_message_mid_stream_leaves_no_partial_text(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.settings = dataclasses.replace(
                services.settings, bot=dataclasses.replace(services.settings.bot, stream_edit_interval_s=0.0)
            )
            await _persona(h, services, ALICE, "Alice", "risotto")
            await _open(h)
            services.engine = _SlowEngine(services.engine)
            _dispatch(h, BOB, ASK, h.TEXT)
            for _ in range(100):
                await asyncio.sleep(0.02)
                if _hooks(h):
                    break
            assert _hooks(h), "the persona's message is streaming"
            await h.say(CAROL, "I'd say risotto too")
            await h.settle()
            deleted = [
                c for c in h.fake.calls if c.method == "DELETE" and c.path.startswith("/webhooks/7777/")
            ]
            assert len(deleted) == len(_hooks(h)) == 1, "the half message was taken back"
            assert h.bot.chat.replies == {} or all(
                not r.text.endswith("▌") for r in h.bot.chat.replies.values()
            )
            # Nothing stayed in the channel: the budget turn was given back.
            assert await services.store.joins.spent("join", [str(ALICE)], time.time()) == {}

    asyncio.run(scenario())


def test_consent_withdrawn_while_typing_stops_the_turn_before_any_message(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            services.settings = dataclasses.replace(
                services.settings, join=dataclasses.replace(services.settings.join, max_typing_s=0.6)
            )
            h.bot.join.settings = services.settings.join
            await _persona(h, services, ALICE, "Alice", "risotto")
            await _open(h)
            _dispatch(h, BOB, ASK, h.TEXT)
            for _ in range(100):
                await asyncio.sleep(0.02)
                if any(e.endswith("/typing") for e in h.fake.events):
                    break
            assert any(e.endswith("/typing") for e in h.fake.events), "she is 'typing'"
            await h.click("doppel:consent:join", ALICE)  # `join` withdrawn
            await h.settle()
            assert services.engine.requests == [] and _hooks(h) == []
            assert await services.store.joins.spent("join", [str(ALICE)], time.time()) == {}

    asyncio.run(scenario())


def test_who_wrote_when_is_kept_only_for_members_who_let_their_persona_join(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _persona(h, services, ALICE, "Alice", "risotto")
            await _open(h, "normal")
            await h.say(BOB, "hello all")  # Bob never opted in to anything
            await h.say(ALICE, "hi, back myself")
            rows = await services.store.fetchall("SELECT member_id FROM join_seen")
            assert {r[0] for r in rows} == {str(ALICE)}, "nothing of a member who did not opt in is stored"

    asyncio.run(scenario())
