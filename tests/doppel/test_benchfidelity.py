"""The fidelity harness's data path and the recipe/prompt knobs it compares (the training runs are benchmarks)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from core.chatformat import DEFAULT_STYLE, STYLES, Utterance, build_messages
from doppel import benchfidelity as bf
from doppel.benchstore import Heldout


def test_the_retrieval_persona_never_sees_a_heldout_reply() -> None:
    class Inner:
        async def examples(self, member_id: str, context: Any, k: int) -> list[str]:
            return ["the  answer", "other one", "third", "fourth"][:k]

        def forget(self, member_id: str) -> None: ...

    got = asyncio.run(Heldout(Inner(), {"the answer"}).examples("m", [], 2))
    assert got == ["other one", "third"]


def test_prompt_styles_frame_the_conversation_as_declared() -> None:
    ctx = [Utterance("2", "Bob", "hey"), Utterance("1", "Ann", "yo"), Utterance("2", "Bob", "sup")]
    named = build_messages("1", "Ann", "general", ctx, style="persona")
    assert "You are Ann" in named[0]["content"] and named[1]["content"] == "Bob: hey"
    plain = build_messages("1", "Ann", "general", ctx, style="plain")
    assert "Ann" not in plain[0]["content"] and [m["content"] for m in plain[1:]] == ["hey", "yo", "sup"]
    short = build_messages("1", "Ann", "general", ctx, style="plain+names")
    assert short[0] == plain[0] and [m["content"] for m in short[1:]] == ["Bob: hey", "yo", "Bob: sup"]
    assert build_messages("1", "Ann", "general", ctx) == build_messages(
        "1", "Ann", "general", ctx, style=DEFAULT_STYLE
    )
    multi = build_messages("1", "Ann", "general", ctx, multi=True, style="plain")
    assert multi[1]["content"] == "Bob: hey", "the multi-persona adapter always needs speaker names"
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_messages("1", "Ann", "general", ctx, style="fancy")


def test_a_job_trains_in_the_prompt_style_it_names(settings: Any) -> None:
    from jobspec.config import TrainConfig
    from jobspec.errors import JobConfigError

    cfg = TrainConfig.from_settings(settings, base_model="m.gguf")
    assert cfg.prompt_style == DEFAULT_STYLE and TrainConfig.choices("prompt_style") == tuple(STYLES)
    with pytest.raises(JobConfigError, match="prompt_style must be one of"):
        TrainConfig.from_settings(settings, base_model="m.gguf", prompt_style="fancy")


def test_steps_follow_the_data_within_the_preset_bounds(tmp_path: Path) -> None:
    from jobspec.config import PRESETS, TrainConfig

    cfg = TrainConfig(
        base_model="m.gguf",
        max_steps=0,
        epochs=1.0,
        micro_batch_size=4,
        grad_accum=2,
        max_steps_cap=150,
        min_steps=20,
    )
    assert cfg.steps_for(800) == 100 and cfg.steps_for(50_000) == 150 and cfg.steps_for(40) == 20
    assert TrainConfig(base_model="m.gguf", max_steps=7).steps_for(50_000) == 7
    rows = [{"prompt": "p", "completion": "c", "n_tokens": 200}] * 400
    assert cfg.for_rows(rows).max_steps == 50, "without a budget, epochs over the rows"
    budgeted = dataclasses.replace(cfg, token_budget=48_000)
    # 48,000 tokens / (200 tokens x 8 examples a step) = 30 steps, not the 50 an epoch would take.
    assert budgeted.for_rows(rows).max_steps == 30
    assert budgeted.for_rows(rows[:80]).max_steps == 20, "a small member stays at min_steps"
    assert budgeted.steps_for(400) == 50, "the budget needs the examples' length, known once tokenized"
    job = tmp_path / "job"
    job.mkdir()
    cfg.to_json(job / "config.json")
    assert TrainConfig.from_json(job / "config.json").max_steps == 0, "resolved by the recipe, from the data"
    assert set(PRESETS) == {"quick", "good", "best"}
    assert all(p["token_budget"] > 0 for p in PRESETS.values()), "every preset bounds its time"


def test_a_steps_scale_scales_what_the_trainer_resolves(settings: Any) -> None:
    from jobspec.config import TrainConfig

    rows = [{"prompt": "p", "completion": "c", "n_tokens": 200}] * 2000

    def steps(overrides: dict[str, Any]) -> int:
        return TrainConfig.from_settings(settings, base_model="m.gguf", **overrides).for_rows(rows).max_steps

    # The preset `good`: 2,000 examples would be 250 steps, capped at 120, and 160k tokens / (200 x 8) = 100.
    assert steps(bf._scaled(settings, {}, 1.0)) == 100
    assert steps(bf._scaled(settings, {}, 0.5)) == 50, "the token budget scales with the steps"
    assert steps(bf._scaled(settings, {"max_steps": 120}, 0.25)) == 30


def test_presets_apply_unless_the_operator_changed_a_setting(settings: Any) -> None:
    import dataclasses

    from jobspec.config import PRESETS, TrainConfig
    from jobspec.errors import JobConfigError

    quick = TrainConfig.from_settings(settings, base_model="m.gguf", preset="quick")
    assert quick.preset == "quick" and quick.max_steps_cap == PRESETS["quick"]["max_steps_cap"]
    assert quick.max_steps == 0, "steps come from the data"
    tuned = dataclasses.replace(settings, training=dataclasses.replace(settings.training, learning_rate=1e-4))
    assert TrainConfig.from_settings(tuned, base_model="m.gguf").learning_rate == 1e-4
    with pytest.raises(JobConfigError):
        TrainConfig.from_settings(settings, base_model="m.gguf", preset="fastest")
    # A server's own preset and prompt style ([training] preset / prompt_style); a job's choice still wins.
    server = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, preset="best", prompt_style="plain+names")
    )
    chosen = TrainConfig.from_settings(server, base_model="m.gguf")
    assert chosen.preset == "best" and chosen.prompt_style == "plain+names"
    assert (chosen.lora_r, chosen.learning_rate) == (
        PRESETS["best"]["lora_r"],
        PRESETS["best"]["learning_rate"],
    )
    # A value the operator set wins even where it equals another preset's (the good preset's rank under best).
    pinned = dataclasses.replace(server, training=dataclasses.replace(server.training, lora_r=16, epochs=1.0))
    assert (TrainConfig.from_settings(pinned, base_model="m.gguf").lora_r, chosen.lora_r) == (16, 32)
    assert TrainConfig.from_settings(pinned, base_model="m.gguf").epochs == 1.0 != chosen.epochs
    assert TrainConfig.from_settings(server, base_model="m.gguf", preset="quick").preset == "quick"
    broken = dataclasses.replace(
        settings, training=dataclasses.replace(settings.training, prompt_style="fancy")
    )
    with pytest.raises(JobConfigError, match="prompt_style must be one of"):
        TrainConfig.from_settings(broken, base_model="m.gguf")


def _tiny_logs(path: Path) -> Path:
    """Three speakers with distinct written styles over two windows: enough for a panel, a member and openings."""
    import gzip
    import random

    rng = random.Random(7)
    words = ["disk", "boot", "grub", "apt", "kernel", "driver", "wifi", "sound", "mount", "update"]
    styles = {
        "alice": lambda w: f"{w} ok try sudo apt-get install {w} lol",
        "bob": lambda w: f"Have you checked the {w.upper()} settings? Please read the documentation.",
        "carol": lambda w: f"hmm... {w}?? no idea, maybe reboot :)",
    }
    logs = []
    for k in range(2):
        lines = []
        for i in range(150):
            nick = ["bob", "alice", "carol"][i % 3] if rng.random() < 0.7 else rng.choice(list(styles))
            text = styles[nick](rng.choice(words))
            if nick == "alice" and i % 3 == 1:
                text = f"bob: {text}"
            lines.append([600 + i // 4, nick, text])
        logs.append({"log": f"t{k}", "date": f"2010-01-0{k + 1}", "lines": lines})
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(log) for log in logs) + "\n")
    return path


@pytest.mark.slow
def test_the_harness_runs_end_to_end_on_the_tiny_model(
    tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Import, train through the supervisor, serve through llama.cpp, attribute, own vs other: JSON complete."""
    import argparse
    import dataclasses

    from trainer.tinymodel import build_tiny

    tiny = build_tiny(tmp_path / "tiny")
    settings = dataclasses.replace(
        settings,
        model=dataclasses.replace(settings.model, base_gguf=str(tiny.gguf_path), base_name="tiny"),
        inference=dataclasses.replace(settings.inference, n_ctx=512, n_threads=1, prompt_token_budget=400),
    )
    overrides = {
        "base_model": str(tiny.hf_dir),
        "base_gguf": str(tiny.gguf_path),
        "base_name": "tiny",
        "max_steps": 4,
        "micro_batch_size": 4,
        "learning_rate": 5e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "threads": 1,
        "max_length": 256,
    }
    monkeypatch.setitem(bf.CONFIGS, "tiny", {**overrides, "prompt_style": "plain"})
    monkeypatch.setattr(bf, "JOB_EVAL", {**bf.JOB_EVAL, "eval_max_examples": 8})
    args = argparse.Namespace(
        configs="tiny",
        openings=3,
        steps_scale=1.0,
        panel=3,
        member="alice",
        quick=False,
        data=str(_tiny_logs(tmp_path / "logs.jsonl.gz")),
        no_own_vs_other=False,
    )
    homes: list[str] = []
    real_mkdtemp = bf.tempfile.mkdtemp

    def mkdtemp(suffix: Any = None, prefix: Any = None, dir: Any = None) -> str:
        if prefix != "doppel-bench-fidelity-":
            return real_mkdtemp(suffix, prefix, dir)
        homes.append(real_mkdtemp(prefix=prefix, dir=tmp_path))
        return homes[-1]

    monkeypatch.setattr(bf.tempfile, "mkdtemp", mkdtemp)
    out = asyncio.run(bf.run_fidelity(settings, args))
    # The harness's own store (a corpus imported with consent, adapters, the base cache) does not outlive it.
    assert homes and not Path(homes[0]).exists() and "home" not in out
    assert out["panel"][0] == "alice" and out["chance"] == pytest.approx(1 / 3, abs=1e-3)
    n = out["openings"]
    assert 1 <= n <= 3 and 0.0 <= out["ceiling"]["share"] <= 1.0
    tiny_entry = out["systems"]["tiny"]
    assert tiny_entry["config"]["max_steps"] == 4 and tiny_entry["style"] == "plain"
    assert tiny_entry["training"]["steps"] == 4 and tiny_entry["training"]["real_tokens"] > 0
    for mode in ("adapter", "adapter+retrieval"):
        assert tiny_entry[mode]["n"] == n and 0.0 <= tiny_entry[mode]["share"] <= 1.0
        assert len(tiny_entry[mode]["hits"]) == n
        assert tiny_entry[mode]["share"] == pytest.approx(tiny_entry[mode]["hits"].count("1") / n, abs=1e-3)
    own = out["own_vs_other"]
    assert own["member"] == "alice" and own["other"] in out["panel"][1:] and own["ppl"]["rows"] > 0
    assert own["steps"] == 4, "the other member trains as many steps as the member"
    assert all(own["ppl"][k] > 0 for k in ("base", "own_adapter", "other_adapter"))


def test_doppel_train_preset_choices_come_from_the_declared_presets(settings: Any) -> None:
    import argparse

    from doppel.commands import train
    from jobspec.config import PRESETS, TrainConfig

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers(dest="cmd"))
    action = next(
        a
        for a in parser._subparsers._group_actions[0].choices["train"]._actions  # type: ignore[union-attr]
        if "--preset" in a.option_strings
    )
    assert tuple(action.choices) == tuple(PRESETS)
    args = parser.parse_args(["train", "123", "--preset", "best"])
    overrides = train._overrides(args)
    assert overrides == {"preset": "best"}
    cfg = TrainConfig.from_settings(settings, base_model="m.gguf", **overrides)
    assert cfg.preset == "best" and cfg.lora_r == PRESETS["best"]["lora_r"] and cfg.max_steps == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "123", "--preset", "fastest"])


def test_a_configuration_label_changes_the_inference_settings_it_names(settings: Any) -> None:
    from core.errors import UserFacingError
    from doppel.benchmembers import variant

    changed = variant(settings, "auto@retrieval_k=8@whole_sentences=true@temperature=0.9")
    assert (changed.inference.retrieval_k, changed.inference.whole_sentences) == (8, True)
    assert changed.inference.temperature == 0.9 and changed.dataset == settings.dataset
    assert variant(settings, "auto@fit_shape=false").inference.fit_shape is False
    for bad, says in (
        ("auto@nope=1", "not KEY=VALUE"),
        ("auto@retrieval_k=many", "expected int, got 'many'"),
        ("auto@fit_shape=nope", "expected bool, got 'nope'"),
    ):
        with pytest.raises(UserFacingError, match=says):
            variant(settings, bad)
