"""The demo's generated community: a realistic export that imports cleanly and keeps styles apart."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from consent.service import ConsentService
from core.settings import Settings
from data.dce_import import import_exports
from data.store import Store
from doppel.samplecommunity import BOT_ID, MEMBERS, write_community


def test_generated_community_imports_with_exact_counts(settings: Settings, tmp_path: Path) -> None:
    paths = write_community(tmp_path / "export", n_messages=600, seed=3)
    messages = [m for p in paths for m in json.loads(p.read_text(encoding="utf-8"))["messages"]]
    ids = [m["id"] for m in messages]
    assert len(ids) == len(set(ids)), "message ids must be unique across channels"
    by_author = Counter(m["author"]["id"] for m in messages)
    consenting = [m.id for m in MEMBERS if m.name != "prof_hale"]
    prof = next(m.id for m in MEMBERS if m.name == "prof_hale")

    async def scenario() -> dict:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(consenting, ["train"], actor="test", channel="cli")
            return (await import_exports(store, paths))["total"]

    total = asyncio.run(scenario())
    assert total["read"] == len(messages)
    assert total["stored"] == sum(by_author[i] for i in consenting)
    assert total["skipped"].get("no_consent") == by_author[prof]
    assert total["skipped"].get("bot", 0) == by_author[BOT_ID]
    assert "id_conflict" not in total["skipped"] or total["skipped"]["id_conflict"] == 0


def test_styles_are_distinct() -> None:
    import random

    rng = random.Random(1)
    samples = {m.name: [m.style(rng, "pizza") for _ in range(30)] for m in MEMBERS}
    assert all(s.upper() == s for s in samples["captain_rook"])
    assert all(s[0].isupper() and s.endswith(".") and ("," in s or ";" in s) for s in samples["prof_hale"])
    assert all("~" in s or "♡" in s for s in samples["mara.moon"])
    assert all(s.lower() == s for s in samples["pixelkat"])
