"""A 1,500-member community in real SQLite: what one member's work reads stays bounded by that member, not the server."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consent.service import ConsentService
from core.chatformat import ChatFormat
from core.settings import Settings
from data.dce_import import import_exports
from data.messages import MessageRepo
from data.store import Store
from doppel.cli import main
from doppel.samplecommunity import write_large_community

MEMBERS, MESSAGES, PERSONA_MESSAGES = 1500, 30_000, 300
FMT = ChatFormat(
    template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    eos_token="<|im_end|>",
)


@pytest.fixture
def community(settings: Settings, tmp_path: Path) -> dict[str, Any]:
    """The generated community imported into the test's store, everyone consenting to train and chat."""
    gen = write_large_community(
        tmp_path / "export", MEMBERS, MESSAGES, channels=3, top_messages=PERSONA_MESSAGES, seed=4
    )

    async def load() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(gen["members"], "train,chat", "test", "cli")
            await import_exports(store, [Path(p) for p in gen["paths"]])

    asyncio.run(load())
    return gen


class _Decodes:
    """Counts messages decrypted by the store (every read of message content goes through `_decode`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        original = MessageRepo._decode

        async def counted(repo: MessageRepo, row: Any) -> Any:
            self.n += 1
            return await original(repo, row)

        monkeypatch.setattr(MessageRepo, "_decode", counted)


def test_materialize_reads_the_members_conversations_not_the_server(
    settings: Settings, community: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.dataset import build_dataset, materialize

    s = replace(settings, training=replace(settings.training, min_examples=5))
    persona = community["members"][0]
    own = community["per_author"][persona]
    decodes = _Decodes(monkeypatch)

    async def go() -> tuple[dict[str, Any], list[Any]]:
        async with Store.open(s) as store:
            meta = await materialize(store, s, persona, s.jobs_dir / "j1", FMT, encrypt=False)
            read = decodes.n
            every = [m async for m in store.messages.iter_channels(await store.messages.channels_of(persona))]
            return {**meta, "_read": read}, every

    meta, every = asyncio.run(go())
    assert len(every) == MESSAGES
    # The member's messages and a window before each: a fraction of the server, growing with the member only.
    assert own <= meta["_read"] <= own * 16 < MESSAGES / 4, (own, meta["_read"])
    # Same examples as a build over every message of the member's channels (the context never reaches further).
    full = build_dataset(every, persona, s, FMT)
    assert meta["counts"]["train"] == len(full.train) and meta["counts"]["heldout"] == len(full.heldout)
    rows = [
        json.loads(line) for line in (s.jobs_dir / "j1" / "dataset" / "train.jsonl").read_text().splitlines()
    ]
    assert sorted(r["prompt"] for r in rows) == sorted(ex.prompt for ex in full.train)
    assert meta["counts"]["attribution_panel"] <= 17


def test_retrieval_reads_only_the_newest_messages_and_their_vectors(
    settings: Settings, community: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import inference.retrieval as retrieval

    monkeypatch.setattr(retrieval, "MAX_MESSAGES", 50)
    persona = community["members"][0]
    decodes = _Decodes(monkeypatch)

    def fake_encode(self: Any, texts: list[str]) -> Any:
        self.encoded += len(texts)
        return np.stack([np.full(4, (hash(t) % 97) / 97, dtype=np.float32) for t in texts])

    monkeypatch.setattr(retrieval.Retriever, "_encode", fake_encode)

    async def go() -> tuple[Any, Any, list[str], int]:
        async with Store.open(settings) as store:
            r = retrieval.Retriever(store, settings, model_path=Path("/nonexistent"))
            first = await r._index(persona)
            read_first = decodes.n
            r.forget(persona)
            again = await r._index(persona)  # the vectors come from the store now, only those 50
            newest = [
                m.content
                for m in await store.messages.for_member(persona)
                if len(m.content.strip()) >= settings.dataset.min_chars
            ][-50:]
            return first, again, newest, read_first

    first, again, newest, read_first = asyncio.run(go())
    assert first.texts == newest == again.texts and first.matrix.shape == (50, 4)
    assert read_first <= 60, f"read {read_first} messages for a 50-message index"
    assert np.array_equal(first.matrix, again.matrix)


def test_registry_lists_a_page_in_one_query(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.registry import Registry

    async def go() -> None:
        async with Store.open(settings) as store:
            async with store.write() as db:
                for i in range(MEMBERS):
                    member = str(300_000_000_000_000_000 + i)
                    aid = f"a{i:05d}"
                    await db.execute(
                        "INSERT INTO adapters (id, member_id, base_model, version, status, path, metrics_json, "
                        "meta_json, created_at) VALUES (?, ?, 'smol', 1, ?, ?, '{}', '{}', ?)",
                        (aid, member, "erased" if i % 10 == 0 else "active", f"/x/{i}", time.time()),
                    )
                    await db.executemany(
                        "INSERT INTO adapter_lineage (adapter_id, member_id) VALUES (?, ?)",
                        [(aid, member), (aid, "200000000000000001")],
                    )
            registry = Registry(store, settings)
            calls: list[str] = []
            original = store.fetchall

            async def counted(sql: str, params: Any = ()) -> Any:
                calls.append(sql)
                return await original(sql, params)

            monkeypatch.setattr(store, "fetchall", counted)
            calls.clear()
            page = await registry.list(limit=100)
            assert len(page) == 100 and len(calls) == 1, calls
            assert all(v.lineage == sorted([v.member_id, "200000000000000001"]) for v in page)
            seen: list[str] = []
            offset = 0
            while chunk := await registry.list(limit=400, offset=offset):
                seen += [v.id for v in chunk]
                offset += len(chunk)
            assert len(seen) == len(set(seen)) == await registry.count() == MEMBERS - MEMBERS // 10
            assert len(await registry.list(include_erased=True, limit=5000)) == MEMBERS

    asyncio.run(go())


def test_consent_list_pages_through_every_member(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [str(300_000_000_000_000_000 + i) for i in range(MEMBERS)]

    async def grant() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(ids, "train", "test", "cli")

    asyncio.run(grant())
    got: list[str] = []
    after: list[str] = []
    while True:
        assert main(["--json", "consent", "list", *after]) == 0
        page = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert len(page["members"]) <= 500 and page["total"] == MEMBERS
        got += [m["member_id"] for m in page["members"]]
        if page["next_after"] is None:
            break
        after = ["--after", page["next_after"]]
    assert got == sorted(ids)
    assert main(["consent", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(ids)
    assert main(["consent", "list", "--limit", "7", "--after", ids[10]]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()] == sorted(ids)[11:18]
