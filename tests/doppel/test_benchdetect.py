"""The honest fidelity benchmark's judges: intervals, detectability, the similar panel, the held-out contexts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from doppel import benchdetect as bd


def test_wilson_intervals_hold_the_proportion_and_narrow_with_more_data() -> None:
    small, large = bd.wilson(5, 10), bd.wilson(500, 1000)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    assert bd.wilson(0, 20)[0] == 0.0 and bd.wilson(20, 20)[1] == 1.0
    assert bd.wilson(0, 0) == [0.0, 1.0]


def _lines(rng: random.Random, words: list[str], n: int, length: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*length))) for _ in range(n)]


def test_detectability_is_near_chance_for_the_same_writer_and_high_for_another() -> None:
    rng = random.Random(1)
    words = "yeah sure try sudo apt update then reboot and check the logs again".split()
    real = _lines(rng, words, 120, (3, 9))
    same = _lines(rng, words, 120, (3, 9))
    other = [
        t.capitalize() + ". I hope this helps you, let me know!"
        for t in _lines(rng, "Certainly here is how you can resolve the issue".split(), 120, (6, 14))
    ]
    alike = bd.detectability(same, real)
    unlike = bd.detectability(other, real)
    assert alike["n"] == 240 and alike["ci"][0] <= 0.5 <= alike["ci"][1] + 0.1, alike
    assert unlike["accuracy"] > 0.95 and unlike["ci"][0] > 0.9, unlike


def test_the_panel_is_the_members_who_write_most_like_the_member_not_the_most_active() -> None:
    rng = random.Random(2)
    lower = "ok so try this one lol idk maybe reboot".split()
    formal = "Please ensure that the configuration file is correct.".split()
    authors = {
        "ann": _lines(rng, lower, 300, (3, 8)),
        "bo": _lines(rng, lower, 300, (3, 8)),  # writes like ann
        "cy": [t.upper() + "!!!" for t in _lines(rng, formal, 3000, (4, 9))],  # prolific, unlike ann
        "di": [t + "." for t in _lines(rng, formal, 2000, (4, 9))],
    }
    assert bd.similar_panel(authors, "ann", size=2) == ["ann", "bo"]
    assert bd.similar_panel(authors, "ann", size=3)[:2] == ["ann", "bo"]
    # The member under another nick's case is not a comparison writer, however alike they write.
    twins = {**authors, "Ann": list(authors["ann"])}
    assert "Ann" not in bd.similar_panel(twins, "ann", size=3)


@dataclass(frozen=True)
class T:
    author_id: str
    author_name: str
    channel_id: str
    start: float
    text: str


@dataclass(frozen=True)
class Ex:
    channel_id: str
    ts: float
    target: str


def test_contexts_carry_the_turns_before_each_reply_and_skip_the_members_own_follow_ups() -> None:
    turns = {
        "c": [
            T("2", "Bob", "c", 1.0, "hi"),
            T("3", "Cy", "c", 2.0, "anyone know grub?"),
            T("1", "Ann", "c", 3.0, "try update-grub"),
            T("1", "Ann", "c", 4.0, "then reboot"),
            T("2", "Bob", "c", 5.0, "thanks"),
            T("1", "Ann", "c", 6.0, "np"),
        ]
    }
    held = [Ex("c", 3.0, "try update-grub"), Ex("c", 4.0, "then reboot"), Ex("c", 6.0, "np")]
    got = bd.heldout_contexts(turns, held, "1", n=10)
    assert [c["reply"] for c in got] == ["try update-grub", "np"]
    assert got[0]["context"] == [("2", "Bob", "hi"), ("3", "Cy", "anyone know grub?")]
    assert len(got[1]["context"]) == 5 and got[1]["context"][-1] == ("2", "Bob", "thanks")
    assert bd.banned_texts(held) == {"try update-grub", "then reboot", "np"}


def test_shape_and_pooled_figures_count_every_reply() -> None:
    s = bd.shape(["one line", "two\nlines", "a much longer single line here"])
    assert s["lines"]["mean"] == 1.33 and s["multi_line"]["share"] == 0.333
    members = {
        m: {
            "systems": {
                "auto": {
                    "attribution": {"share": share, "n": 100},
                    "detectability": {"accuracy": acc, "n": 200},
                }
            }
        }
        for m, share, acc in (("a", 0.4, 0.6), ("b", 0.2, 0.8))
    }
    pooled = bd.pooled(members, "auto")
    assert pooled["attribution"]["share"] == 0.3 and pooled["attribution"]["n"] == 200
    assert pooled["detectability"]["accuracy"] == 0.7 and pooled["detectability"]["n"] == 400
