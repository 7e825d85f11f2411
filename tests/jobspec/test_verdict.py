"""The activation gate (the adapter must beat the base model's held-out perplexity) and the report's verdict line."""

from __future__ import annotations

import math

from jobspec.verdict import format_report, gate


def test_gate_needs_the_adapter_to_beat_the_base_model() -> None:
    assert gate({"ppl_base": 30.0, "ppl_adapter": 12.5}) == (
        True,
        "held-out perplexity 12.50 beats the base model's 30.00",
    )
    active, reason = gate({"perplexity": {"base": 10.0, "adapter": 11.0}})
    assert not active and "does not beat" in reason and "candidate" in reason
    assert not gate({"ppl_base": 10.0, "ppl_adapter": 10.0})[0]
    assert not gate({"ppl_base": math.nan, "ppl_adapter": 1.0})[0]
    assert not gate({"ppl_adapter": 1.0})[0]


def test_the_report_ends_with_the_gates_verdict() -> None:
    assert format_report({"ppl_base": 5.0, "ppl_adapter": 9.0}).splitlines()[-1].startswith("CANDIDATE:")
    assert format_report({"ppl_base": 9.0, "ppl_adapter": 5.0}).splitlines()[-1].startswith("ACTIVE:")
