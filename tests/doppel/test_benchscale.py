"""`doppel bench scale --quick`: every phase measured in its own process, the trainer's peaks compared, forget complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from core.errors import UserFacingError
from doppel.benchscale import PHASES, parse_sizes
from doppel.samplecommunity import large_members, write_large_community


def test_large_community_is_valid_streamed_export_with_the_persona_most_active(tmp_path: Path) -> None:
    result = write_large_community(tmp_path, members=60, messages=3000, channels=3, top_messages=400, seed=5)
    messages = [
        m for p in result["paths"] for m in json.loads(Path(p).read_text(encoding="utf-8"))["messages"]
    ]
    assert len(messages) == result["messages"] == 3000
    assert len({m["id"] for m in messages}) == len(messages), "message ids are unique across channels"
    authors = Counter(m["author"]["id"] for m in messages)
    assert authors == Counter(result["per_author"])
    persona = result["members"][0]
    assert authors.most_common(1)[0][0] == persona
    assert set(authors) <= set(result["members"]) and len(authors) > 40, "most members speak"
    replies = [m for m in messages if m["type"] == "Reply"]
    assert replies and all(m["reference"]["messageId"] for m in replies)


def test_large_members_have_distinct_styles() -> None:
    people = large_members(2000)
    assert len({(m.style, m.quirk, m.mark) for m in people}) == 2000
    assert len({m.id for m in people}) == 2000


@pytest.mark.parametrize("bad", ["", "200", "200x", "axb", "3x40000", "200x10"])
def test_bad_sizes_are_one_line_errors(bad: str) -> None:
    with pytest.raises(UserFacingError, match="bench scale"):
        parse_sizes(bad)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_measures_every_phase_and_forgets_the_persona(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DOPPEL_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    ran = subprocess.run(
        [sys.executable, "-m", "doppel", "--json", "bench", "scale", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    (size,) = result["sizes"]
    assert size["members"] == 40 and size["messages"] == 4000
    assert set(size["phases"]) == set(PHASES)
    for name, phase in size["phases"].items():
        assert phase["seconds"] > 0 and phase["peak_rss_mb"] > 0, name
        assert phase["sampled_peak_rss_mb"]["process"] > 0, name
    assert size["phases"]["import"]["stored"] == size["messages"], "every generated member consented"
    trainer = size["trainer"]
    assert trainer["evaluation"] == "done" and trainer["heldout_examples"] > 0
    assert 0 < trainer["training_peak_rss_mb"] <= trainer["peak_rss_mb"]
    assert trainer["ratio"] == round(trainer["peak_rss_mb"] / trainer["training_peak_rss_mb"], 3)
    assert trainer["within_limit"] == (trainer["ratio"] <= 1.5) and trainer["within_limit"]
    train = size["phases"]["train"]
    # The kernel's peak of the train phase's tree includes the trainer child it reaped.
    assert train["peak_rss_mb"] >= trainer["peak_rss_mb"] - 1
    assert train["sampled_peak_rss_mb"]["trainer_child"] > train["sampled_peak_rss_mb"]["process"]
    assert size["phases"]["chat"]["mode"].startswith("adapter") and size["phases"]["chat"]["reply_chars"] > 0
    before, after = size["persona_rows_before_forget"], size["persona_rows_after_forget"]
    assert before["messages"] == size["persona_messages"] > 0 and before["adapters_not_erased"] == 1
    assert after == {k: 0 for k in before}, after
    assert size["phases"]["forget"]["messages_erased"] == before["messages"]
    assert result["trainer_peak_rss_mb"] == [trainer["peak_rss_mb"]] and result["all_within_limit"] is True
