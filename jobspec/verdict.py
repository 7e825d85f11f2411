"""The activation gate and the fidelity report as text: one perplexity rule for the trainer and the registry."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SYSTEMS = ("base", "adapter", "retrieval")


def _ppl(metrics: Mapping[str, Any], system: str) -> float | None:
    # Two shapes are accepted: the recipes' flat `ppl_base` / `ppl_adapter`, or {"perplexity": {"base": ...}}.
    value = metrics.get(f"ppl_{system}")
    if value is None and isinstance(metrics.get("perplexity"), Mapping):
        value = metrics["perplexity"].get(system)
    return None if value is None else float(value)


def gate(metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """An adapter becomes active only if its held-out perplexity beats the base model's."""
    base, adapter = _ppl(metrics, "base"), _ppl(metrics, "adapter")
    if base is None or adapter is None:
        return False, "held-out perplexity was not measured for both the base model and the adapter"
    if not (math.isfinite(base) and math.isfinite(adapter)):
        return False, "held-out perplexity is not finite"
    if adapter < base:
        return True, f"held-out perplexity {adapter:.2f} beats the base model's {base:.2f}"
    return (
        False,
        f"held-out perplexity {adapter:.2f} does not beat the base model's {base:.2f}: kept as a candidate",
    )


_ROWS = (
    ("embedding_cosine", "embedding cosine (paired) ↑"),
    ("centroid_cosine", "embedding cosine (centroid) ↑"),
    ("length_wasserstein", "length distance, chars ↓"),
    ("length_ks", "length KS statistic ↓"),
    ("vocab_jaccard", "vocabulary Jaccard ↑"),
    ("emoji_rate_diff", "emoji/message |diff| ↓"),
    ("punctuation_rate_diff", "punctuation/char |diff| ↓"),
    ("caps_rate_diff", "capitals/letter |diff| ↓"),
    ("mean_length", "mean length, chars"),
)


def blind_test_line(results: Mapping[str, Any]) -> str:
    """The blind-test summary: how often members picked the real message over the persona's (chance is 50%)."""
    votes = int(results.get("votes") or 0)
    if not votes:
        return "blind test: no votes yet (`/persona guess`)"
    share = int(results.get("identified_real") or 0) / votes
    return f"blind test: {votes} vote{'s' if votes != 1 else ''}, {share:.0%} identified the real message (chance 50%)"


def format_report(metrics: Mapping[str, Any], blind: Mapping[str, Any] | None = None) -> str:
    """A plain-text table: base vs adapter (vs retrieval-only when present), blind-test votes, then the gate decision."""
    fidelity = metrics.get("fidelity") or {}
    style = fidelity.get("style") or {}
    attribution = fidelity.get("attribution") or {}
    columns = [
        s for s in SYSTEMS if s in style or _ppl(metrics, s) is not None or s in attribution.get("share", {})
    ]
    columns = columns or ["base", "adapter"]
    table: list[list[str]] = [["metric", *columns]]
    table.append(["held-out perplexity ↓", *(_cell(_ppl(metrics, s)) for s in columns)])
    for key, label in _ROWS:
        if any(key in style.get(s, {}) for s in columns):
            table.append([label, *(_cell(style.get(s, {}).get(key)) for s in columns)])
    if attribution.get("available"):
        table.append(["attributed to member ↑", *(_cell(attribution["share"].get(s)) for s in columns)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if style.get("adapter", {}).get("mean_length_real") is not None:
        lines.append(
            f"real replies: mean length {style['adapter']['mean_length_real']:.1f} chars, "
            f"{fidelity.get('n_real', '?')} held-out"
        )
    if attribution.get("available"):
        lines.append(
            f"authorship: chance {attribution['chance']:.2f} among a panel of {attribution['members']} members "
            f"({attribution.get('panel_rule') or 'the member and comparison members'}); "
            f"classifier accuracy {attribution['accuracy']:.2f} on held-out real messages"
        )
    elif attribution.get("reason"):
        lines.append(f"authorship: {attribution['reason']}")
    if blind is not None:
        lines.append(blind_test_line(blind))
    active = metrics.get("active")
    reason = metrics.get("gate_reason")
    if active is None or not reason:
        active, reason = gate(metrics)
    lines.append(f"{'ACTIVE' if active else 'CANDIDATE'}: {reason}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
