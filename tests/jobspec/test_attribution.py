"""The character n-gram authorship classifier on clearly different synthetic writing styles."""

from __future__ import annotations

import random

import pytest

from jobspec.attribution import attribution_report, train_authorship
from jobspec.errors import EvaluationError

WORDS = "game tonight server build patch raid boss map queue team loot level music movie pizza work".split()


def _lower(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, 4)) + rng.choice([" lol", " lmao", " ngl", " tbh"])


def _shouty(rng: random.Random) -> str:
    return " ".join(w.capitalize() for w in rng.sample(WORDS, 4)) + rng.choice(["!!! 😂", "!! 🔥🔥", "!!!"])


def _formal(rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"Indeed, the {a} is rather splendid; however, the {b} requires attention."


STYLES = {"lower": _lower, "shouty": _shouty, "formal": _formal}


def _rows(per_author: int = 40, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"author_id": a, "text": f(rng)} for a, f in STYLES.items() for _ in range(per_author)]


def test_classifier_beats_chance_on_distinct_styles() -> None:
    model = train_authorship(_rows(), seed=1)
    assert set(model.authors) == set(STYLES)
    assert model.accuracy >= 0.9  # chance is 1/3
    rng = random.Random(99)
    assert model.share([_lower(rng) for _ in range(20)], "lower") >= 0.9
    assert model.share([_shouty(rng) for _ in range(20)], "lower") <= 0.1


def test_report_compares_each_systems_share_with_chance() -> None:
    rng = random.Random(5)
    in_style = [_lower(rng) for _ in range(15)]
    off_style = [_formal(rng) for _ in range(15)]
    report = attribution_report(
        _rows(),
        {"adapter": in_style, "base": off_style},
        "lower",
        real_heldout=[_lower(rng) for _ in range(10)],
    )
    assert report["available"] and report["members"] == 3
    assert report["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert report["share"]["adapter"] > report["chance"] > report["share"]["base"]
    assert report["lift"]["adapter"] > 2
    assert report["real_heldout_share"] >= 0.9
    # With intervals, and how often each system is told apart from the member's real replies (50%: never).
    low, high = report["share_ci"]["adapter"]
    assert low < report["share"]["adapter"] < high or report["share"]["adapter"] in (low, high)
    told = report["detectability"]
    assert told["adapter"]["n"] == 25 and told["base"]["n"] == 25
    assert told["base"]["accuracy"] >= 0.9 > told["adapter"]["accuracy"], told
    assert told["base"]["ci"][0] > 0.6 and told["adapter"]["ci"][0] < 0.6, told


def test_attribution_needs_two_members_and_says_why() -> None:
    rows = [{"author_id": "solo", "text": f"message {i}"} for i in range(20)]
    with pytest.raises(EvaluationError, match="two members"):
        train_authorship(rows)
    report = attribution_report(rows, ["hello"], "solo")
    assert report == {"available": False, "reason": report["reason"]} and "two members" in report["reason"]
    missing = attribution_report(_rows(), ["hello"], "nobody")
    assert not missing["available"] and "nobody" in missing["reason"]
