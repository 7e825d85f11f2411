"""`doppel eval`'s header says how often the persona is told apart from the member, with its interval."""

from __future__ import annotations

from doppel.commands.eval import told_apart


def test_the_header_gives_detectability_with_its_interval_and_nothing_when_unmeasured() -> None:
    attribution = {"detectability": {"adapter": {"accuracy": 0.75, "ci": [0.5, 0.9], "n": 8}}}
    said = told_apart(attribution)
    assert "75% of the time" in said and "95% CI 50%-90%" in said and "8 replies" in said
    assert told_apart({"detectability": {"adapter": {"accuracy": None, "ci": None, "n": 2}}}) == ""
    assert told_apart({}) == ""
