"""Reading job folders: reaction weights become seeded oversampling."""

from __future__ import annotations

from trainer.jobdata import weighted_rows


def test_weights_oversample_in_expectation_and_reproducibly() -> None:
    rows = [{"prompt": f"p{i}", "completion": "c", "weight": 1.5 if i % 2 else 1.0} for i in range(2000)]
    out = weighted_rows(rows, seed=7)
    plain = sum(1 for r in out if r["weight"] == 1.0)
    heavy = sum(1 for r in out if r["weight"] == 1.5)
    assert plain == 1000  # weight 1.0: exactly once
    assert 1400 <= heavy <= 1600  # weight 1.5: 1.5 copies on average
    assert out == weighted_rows(rows, seed=7)
    assert out != weighted_rows(rows, seed=8)


def test_rows_without_weight_are_kept_once() -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert weighted_rows(rows, seed=1) == rows
