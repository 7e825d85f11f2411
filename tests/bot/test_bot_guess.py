"""/persona guess: a blind test built from stored messages; one vote per member; results in the fidelity report; erasure."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

ALICE, BOB, CAROL, DAVE = 111, 222, 444, 555
ROUNDS = 10


async def _conversation(services: Any, h: Any, cid: int | None = None) -> list[str]:
    """Bob asks, Alice answers, ROUNDS times an hour apart; returns Alice's message ids, oldest first."""
    from data.records import Message

    cid = cid or h.TEXT
    messages, alice_ids = [], []
    for i in range(ROUNDS):
        t = 1_700_000_000.0 + 3600 * i
        messages.append(
            Message(
                f"{9000 + 2 * i}", str(h.GUILD), str(cid), "general", str(BOB), "bob", t, f"question {i}?"
            )
        )
        messages.append(
            Message(
                f"{9001 + 2 * i}",
                str(h.GUILD),
                str(cid),
                "general",
                str(ALICE),
                "alice",
                t + 30,
                f"alice answer number {i}",
            )
        )
        alice_ids.append(f"{9001 + 2 * i}")
    await services.store.messages.add_many(messages)
    return alice_ids


async def _setup(h: Any, services: Any) -> list[str]:
    await h.click("doppel:consent:train", ALICE)
    await h.click("doppel:consent:chat", ALICE)
    await h.click("doppel:consent:train", BOB)
    await h.active_adapter(services, ALICE)
    return await _conversation(services, h)


def _guess_message(h: Any) -> dict[str, Any]:
    posts = [c.payload for c in h.responses() if c.payload and "Blind test" in str(c.payload.get("content"))]
    assert posts, "the blind test was posted"
    return posts[-1]


def test_guess_posts_a_blind_test_and_counts_one_vote_per_member(
    bot_world: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            alice_ids = await _setup(h, services)
            services.engine.enqueue(["the persona ", "says @everyone hi"])
            h.fake.calls.clear()
            await h.command("persona guess", CAROL, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert h.first_response_type() == 5  # deferred before reading messages and generating
            post = _guess_message(h)
            assert post["allowed_mentions"] == {"parse": []}
            text = post["content"]
            # The held-out reply (the newest one) against the persona's reply to the same context.
            assert f"alice answer number {ROUNDS - 1}" in text and f"question {ROUNDS - 1}?" in text
            assert "the persona says @\u200beveryone hi" in text
            persona, context, _ = services.engine.requests[0]
            assert persona.member_id == str(ALICE) and persona.channel_name == "general"
            assert (context[-1].author_id, context[-1].text) == (str(BOB), f"question {ROUNDS - 1}?")
            assert all(
                u.text != f"alice answer number {ROUNDS - 1}" for u in context
            )  # the answer is not leaked
            ids = [c["custom_id"] for row in post["components"] for c in row["components"]]
            assert len(ids) == 2 and ids[0].endswith(":A") and ids[1].endswith(":B")
            test_id = ids[0].split(":")[2]
            test = await services.store.blind_tests.get(test_id)
            assert test["real_message_id"] == alice_ids[-1] and test["adapter_id"] == f"a{ALICE}"
            # Which line is real is decided at random; the stored label must match the text shown.
            real_line = next(line for line in text.splitlines() if "alice answer number" in line)
            assert real_line.startswith(f"**{test['real_label']}**")
            fake = "B" if test["real_label"] == "A" else "A"
            await h.click(f"doppel:guess:{test_id}:{test['real_label']}", CAROL)
            assert "You were right" in h.sent_texts()[-1]
            await h.click(f"doppel:guess:{test_id}:{fake}", CAROL)  # a second vote by the same member
            assert "already voted" in h.sent_texts()[-1]
            await h.click(f"doppel:guess:{test_id}:{fake}", DAVE)
            assert "fooled" in h.sent_texts()[-1]
            await h.click(
                f"doppel:guess:{test_id}:{test['real_label']}", ALICE
            )  # the member knows the answer
            assert "your own vote" in h.sent_texts()[-1]
            votes = await services.store.blind_tests.votes(test_id)
            assert sorted((v["voter_id"], v["picked_real"]) for v in votes) == [
                (str(CAROL), True),
                (str(DAVE), False),
            ]
            line = "blind test: 2 votes, 50% identified the real message (chance 50%)"
            assert line in h.sent_texts()[-2]
            await h.command("persona report", BOB, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert line in h.sent_texts()[-1]

    asyncio.run(scenario())
    from doppel.cli import main

    assert main(["--json", "eval", str(ALICE)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["blind_test"]["votes"] == 2 and out["blind_test"]["identified_real"] == 1
    assert "blind test: 2 votes, 50% identified the real message (chance 50%)" in out["report"]


def test_guess_needs_chat_consent_stored_messages_and_a_public_channel(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await h.click("doppel:consent:train", ALICE)
            await h.click("doppel:consent:train", BOB)
            await h.active_adapter(services, ALICE)
            h.fake.calls.clear()
            await h.command("persona guess", CAROL, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert "has not allowed chat" in h.sent_texts()[-1]
            first = h.responses()[0].payload  # checked before any acknowledgement: the refusal is ephemeral
            assert first["type"] == 4 and first["data"]["flags"] == 64
            await h.click("doppel:consent:chat", ALICE)
            h.fake.calls.clear()
            await h.command("persona guess", DAVE, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert "no stored messages" in h.sent_texts()[-1]
            assert (
                h.responses()[0].payload["data"]["flags"] == 64
            )  # acknowledged ephemerally: refusals stay private
            # Messages only in a channel this server does not show to everyone: never quoted in a blind test.
            await _conversation(services, h, cid=2999)
            await h.command("persona guess", BOB, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            assert "channels everyone here can read" in h.sent_texts()[-1]
            assert services.engine.requests == []
            assert await services.store.fetchone("SELECT COUNT(*) FROM blind_tests") == (0,)

    asyncio.run(scenario())


def test_erasure_removes_blind_tests_and_votes(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            await _setup(h, services)
            await h.command("persona guess", CAROL, member=(6, str(ALICE)), resolved=h.resolved(ALICE))
            test_id = _guess_message(h)["components"][0]["components"][0]["custom_id"].split(":")[2]
            await h.click(f"doppel:guess:{test_id}:A", CAROL)
            await h.click(f"doppel:guess:{test_id}:B", DAVE)
            # A voter's erasure takes their vote; the test and the other vote stay.
            await services.forget(str(CAROL), actor=str(CAROL))
            assert [v["voter_id"] for v in await services.store.blind_tests.votes(test_id)] == [str(DAVE)]
            # The member's erasure takes their tests and every vote on them; the old buttons then say so.
            await h.command("doppel forget", ALICE)
            confirm = h.responses()[-1].payload["data"]
            await h.click(confirm["components"][0]["components"][0]["custom_id"], ALICE, ephemeral=True)
            assert "Your data was deleted" in h.sent_texts()[-1]
            assert await services.store.blind_tests.get(test_id) is None
            assert await services.store.fetchone("SELECT COUNT(*) FROM blind_votes") == (0,)
            await h.click(f"doppel:guess:{test_id}:A", BOB)
            assert "was deleted" in h.sent_texts()[-1]

    asyncio.run(scenario())
