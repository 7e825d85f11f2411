"""The ingest benchmark's generated export is a valid DCE file whose every message is accounted for."""

from __future__ import annotations

import asyncio
from pathlib import Path

from consent.service import ConsentService
from core.settings import Settings
from data.dce_import import import_exports
from data.store import Store
from doppel.benchingest import HEAVY, write_export


def test_generated_export_imports_and_counts_add_up(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "gen.json"
    counts = write_export(path, 600, authors=20, seed=1, heavy_share=0.4, channel=3)
    assert counts["messages"] == 600 and 150 < counts["heavy"] < 350

    async def go() -> dict:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([HEAVY], "train", "bench", "cli")
            result = await import_exports(store, [path])
            assert await store.messages.authors() == {HEAVY}
            return result

    total = asyncio.run(go())["total"]
    assert total["read"] == 600 and total["failed"] == 0
    assert total["stored"] + sum(total["skipped"].values()) + total["duplicates"] == 600
    assert {"no_consent", "system"} <= set(total["skipped"])
    assert total["stored"] <= counts["heavy"]
