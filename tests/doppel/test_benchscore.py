"""The fidelity benchmark's arithmetic: paired comparisons of systems over the same openings."""

from __future__ import annotations

import pytest

from doppel import benchscore


def test_systems_are_compared_with_the_reference_over_the_same_openings() -> None:
    same = benchscore.paired("1100", "1100")
    assert same == {"difference": 0.0, "se": 0.0, "n": 4}
    better = benchscore.paired("1110", "0100")
    assert better["difference"] == 0.5 and better["se"] == pytest.approx(0.289, abs=1e-3)
    with pytest.raises(ValueError, match="same openings"):
        benchscore.paired("11", "110")
    systems = {
        "base": {"share": 0.0, "hits": "0000"},
        "plain_peft": {"adapter": {"hits": "1100"}, "adapter+retrieval": {"hits": "1111"}},
        "defaults": {"adapter": {"hits": "1000"}, "adapter+retrieval": {"hits": "1111"}},
    }
    got = benchscore.comparisons(systems)
    assert list(got) == ["defaults - plain_peft"]
    assert got["defaults - plain_peft"]["adapter"]["difference"] == -0.25
    assert got["defaults - plain_peft"]["adapter+retrieval"]["difference"] == 0.0
    assert benchscore.comparisons({"defaults": systems["defaults"]}) == {}, "no reference, no comparison"
