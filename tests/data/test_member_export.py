"""A member's data export holds everything stored about them, including persona replies and blind-test votes."""

from __future__ import annotations

import asyncio

from consent.service import ConsentService
from data.export import member_export
from data.store import Store
from doppel.core.settings import Settings

ALICE, BOB = "111111111111111111", "222222222222222222"


def test_export_includes_persona_replies_and_blind_tests(settings: Settings) -> None:
    async def scenario() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([ALICE, BOB], ["train", "chat"], actor="t", channel="cli")
            await store.persona_replies.add(
                "900",
                ALICE,
                adapter_id=None,
                guild_id="1",
                channel_id="2",
                context_members=[BOB],
                payload={"text": "arr matey"},
            )
            test_id = await store.blind_tests.create(ALICE, "555", "A", guild_id="1", channel_id="2")
            assert await store.blind_tests.vote(test_id, BOB, "A") is True

            alice = await member_export(store, ALICE)
            assert [r["payload"]["text"] for r in alice["persona_replies"]] == ["arr matey"]
            assert alice["blind_tests_of_persona"]["votes"] == 1
            assert alice["blind_votes_given"] == []

            bob = await member_export(store, BOB)
            assert bob["persona_replies"] == []
            assert [(v["test_id"], v["picked_real"]) for v in bob["blind_votes_given"]] == [(test_id, True)]

    asyncio.run(scenario())
