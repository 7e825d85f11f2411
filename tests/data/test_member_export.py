"""A member's data export holds everything stored about them, including persona replies and blind-test votes."""

from __future__ import annotations

import asyncio

from consent.export import member_export
from consent.service import ConsentService
from core.settings import Settings
from data.store import Store
from doppel.erasure import erasure_parts

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

            alice = await member_export(store, ALICE, erasure_parts())
            assert [r["payload"]["text"] for r in alice["persona_replies"]] == ["arr matey"]
            assert alice["blind_tests_of_persona"]["votes"] == 1
            assert alice["blind_votes_given"] == []

            bob = await member_export(store, BOB, erasure_parts())
            assert bob["persona_replies"] == []
            assert [(v["test_id"], v["picked_real"]) for v in bob["blind_votes_given"]] == [(test_id, True)]

    asyncio.run(scenario())


def test_export_includes_jobs_and_adapters_from_their_owners(settings: Settings) -> None:
    from tests.helpers.rows import seed_adapter, seed_job

    async def scenario() -> None:
        async with Store.open(settings) as store:
            job = await seed_job(store, ALICE, "succeeded")
            own = await seed_adapter(store, member_id=ALICE, job_id=job.id)
            trained_on_alice = await seed_adapter(store, member_id=BOB, lineage=[ALICE])
            await seed_adapter(store, member_id=BOB, version=2)

            alice = await member_export(store, ALICE, erasure_parts())
            assert [j["id"] for j in alice["jobs"]] == [job.id] and alice["jobs"][0]["status"] == "succeeded"
            assert {a["id"]: a["lineage"] for a in alice["adapters"]} == {
                own.id: [ALICE],
                trained_on_alice.id: sorted([ALICE, BOB]),
            }
            bob = await member_export(store, BOB, erasure_parts())
            assert bob["jobs"] == [] and len(bob["adapters"]) == 2

    asyncio.run(scenario())
