"""The fidelity benchmark's corpus: real multi-speaker IRC chat, converted to exports the product imports."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from doppel import benchcorpus, benchstore


def test_the_shipped_corpus_is_real_multi_speaker_chat_with_active_members() -> None:
    logs = benchcorpus.load_logs()
    assert len(logs) > 100
    panel = benchcorpus.choose_panel(logs, 5)
    assert len(panel) == 5 and not set(panel) & benchcorpus.BOTS
    counts = {n: sum(1 for log in logs for _, nick, _ in log["lines"] if nick == n) for n in panel}
    assert min(counts.values()) >= 400, (
        counts
    )  # enough real messages per author for a persona and a classifier
    assert counts[panel[0]] == max(counts.values())


def test_exports_turn_addressing_into_replies_and_import_into_a_store(tmp_path: Path, settings: Any) -> None:
    logs = [
        {
            "log": "x",
            "date": "2008-01-02",
            "lines": [
                [600, "alice", "anyone know how to mount an iso?"],
                [601, "bob", "alice: sudo mount -o loop file.iso /mnt"],
                [601, "alice", "thanks bob"],
                [2, "bob", "after midnight"],
            ],
        }
    ]
    [path] = benchcorpus.to_exports(logs, tmp_path / "exports")
    msgs = json.loads(path.read_text())["messages"]
    assert msgs[1]["reference"]["messageId"] == msgs[0]["id"] and "reference" not in msgs[0]
    assert msgs[1]["timestamp"] < msgs[2]["timestamp"] < msgs[3]["timestamp"], "order kept, midnight crossed"
    assert msgs[0]["author"]["id"] == benchcorpus.author_id("alice") != benchcorpus.author_id("bob")
    prep = asyncio.run(benchstore.prepare(settings, ["alice", "bob"], logs))
    assert prep == {"authors": 2, "stored": 4, "read": 4}


def test_select_logs_keeps_those_where_the_member_speaks_most() -> None:
    logs = [
        {"log": str(i), "date": "2008-01-02", "lines": [[0, "m", "hi"]] * i + [[0, "o", "x"]]}
        for i in range(4)
    ]
    assert [log["log"] for log in benchcorpus.select_logs(logs, ["m"], 2)] == ["2", "3"]
    assert len(benchcorpus.select_logs(logs, ["m"], 0)) == 3  # the one without the member is never needed
