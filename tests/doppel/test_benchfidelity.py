"""The fidelity harness's data path and the recipe/prompt knobs it compares (the training runs are benchmarks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from doppel import benchfidelity as bf
from doppel.chatformat import PLAIN_STYLE, Utterance, build_messages, current_style, use_style


def test_the_shipped_corpus_is_real_multi_speaker_chat_with_active_members() -> None:
    logs = bf.load_logs()
    assert len(logs) > 100
    panel = bf.choose_panel(logs, 5)
    assert len(panel) == 5 and not set(panel) & bf.BOTS
    counts = {n: sum(1 for log in logs for _, nick, _ in log["lines"] if nick == n) for n in panel}
    assert min(counts.values()) >= 400, counts  # enough real messages per author for a persona and a classifier
    assert counts[panel[0]] == max(counts.values())


def test_exports_turn_addressing_into_replies_and_import_into_a_store(tmp_path: Path, settings: Any) -> None:
    logs = [{"log": "x", "date": "2008-01-02", "lines": [
        [600, "alice", "anyone know how to mount an iso?"],
        [601, "bob", "alice: sudo mount -o loop file.iso /mnt"],
        [601, "alice", "thanks bob"],
        [2, "bob", "after midnight"],
    ]}]
    [path] = bf.to_exports(logs, tmp_path / "exports")
    msgs = json.loads(path.read_text())["messages"]
    assert msgs[1]["reference"]["messageId"] == msgs[0]["id"] and "reference" not in msgs[0]
    assert msgs[1]["timestamp"] < msgs[2]["timestamp"] < msgs[3]["timestamp"], "order kept, midnight crossed"
    assert msgs[0]["author"]["id"] == bf.author_id("alice") != bf.author_id("bob")
    prep = asyncio.run(bf._prepare(settings, ["alice", "bob"], logs))
    assert prep == {"authors": 2, "stored": 4, "read": 4}


def test_select_logs_keeps_those_where_the_member_speaks_most() -> None:
    logs = [{"log": str(i), "date": "2008-01-02", "lines": [[0, "m", "hi"]] * i + [[0, "o", "x"]]} for i in range(4)]
    assert [log["log"] for log in bf.select_logs(logs, ["m"], 2)] == ["2", "3"]
    assert len(bf.select_logs(logs, ["m"], 0)) == 3  # the one without the member is never needed


def test_the_retrieval_persona_never_sees_a_heldout_reply() -> None:
    class Inner:
        async def examples(self, member_id: str, context: Any, k: int) -> list[str]:
            return ["the  answer", "other one", "third", "fourth"][:k]

        def forget(self, member_id: str) -> None: ...

    got = asyncio.run(bf._Heldout(Inner(), {"the answer"}).examples("m", [], 2))
    assert got == ["other one", "third"]


def test_prompt_styles_render_the_same_for_training_and_serving() -> None:
    ctx = [Utterance("2", "Bob", "hey"), Utterance("1", "Ann", "yo"), Utterance("2", "Bob", "sup")]
    named = build_messages("1", "Ann", "general", ctx)
    assert "You are Ann" in named[0]["content"] and named[1]["content"] == "Bob: hey"
    with use_style("plain"):
        assert current_style() == PLAIN_STYLE
        plain = build_messages("1", "Ann", "general", ctx)
        multi = build_messages("1", "Ann", "general", ctx, multi=True)
    assert current_style().system == "persona", "the style is restored after the block"
    assert "Ann" not in plain[0]["content"] and [m["content"] for m in plain[1:]] == ["hey", "yo", "sup"]
    assert multi[1]["content"] == "Bob: hey", "the multi-persona adapter always needs speaker names"


def test_steps_follow_the_data_within_the_preset_bounds(tmp_path: Path) -> None:
    from trainer.config import PRESETS, TrainConfig

    cfg = TrainConfig(base_model="m.gguf", max_steps=0, epochs=1.0, micro_batch_size=8, max_steps_cap=150,
                      min_steps=20)
    assert cfg.steps_for(800) == 100 and cfg.steps_for(50_000) == 150 and cfg.steps_for(40) == 20
    assert TrainConfig(base_model="m.gguf", max_steps=7).steps_for(50_000) == 7
    job = tmp_path / "job"
    (job / "dataset").mkdir(parents=True)
    (job / "dataset" / "meta.json").write_text(json.dumps({"counts": {"train": 400}}))
    cfg.to_json(job / "config.json")
    assert TrainConfig.from_json(job / "config.json").max_steps == 50
    assert set(PRESETS) == {"quick", "good", "best"}


def test_presets_apply_unless_the_operator_changed_a_setting(settings: Any) -> None:
    import dataclasses

    from trainer.config import PRESETS, TrainConfig
    from trainer.errors import JobConfigError

    quick = TrainConfig.from_settings(settings, base_model="m.gguf", preset="quick")
    assert quick.preset == "quick" and quick.max_steps_cap == PRESETS["quick"]["max_steps_cap"]
    assert quick.max_steps == 0, "steps come from the data"
    tuned = dataclasses.replace(settings, training=dataclasses.replace(settings.training, learning_rate=1e-4))
    assert TrainConfig.from_settings(tuned, base_model="m.gguf").learning_rate == 1e-4
    with pytest.raises(JobConfigError):
        TrainConfig.from_settings(settings, base_model="m.gguf", preset="fastest")
