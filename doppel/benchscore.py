"""The fidelity benchmark's judge: a fixed authorship classifier, the member's share of replies, paired comparisons."""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from doppel.benchcorpus import author_id, same_text

if TYPE_CHECKING:
    from jobspec.attribution import AuthorshipModel


def classifier(
    logs: Sequence[Mapping[str, Any]], panel: Sequence[str], banned: set[str], seed: int
) -> AuthorshipModel:
    """The fixed judge: hashed char n-grams + linear SVM over the panel's real messages, held-out replies excluded."""
    from jobspec.attribution import train_authorship

    rows: list[dict[str, Any]] = []
    norm_banned = {same_text(b) for b in banned}
    for nick in panel:
        texts = [
            t for log in logs for _, n, t in log["lines"] if n == nick and same_text(t) not in norm_banned
        ]
        rng = random.Random(f"{seed}:{nick}")
        rows += [{"author_id": author_id(nick), "text": t} for t in rng.sample(texts, min(600, len(texts)))]
    return train_authorship(rows, seed=seed)


def style_stats(texts: Sequence[str]) -> dict[str, Any]:
    """Surface style, to read next to attribution: the assistant voice is long, capitalised and punctuated."""
    texts = [t for t in texts if t.strip()] or [""]
    words = [len(t.split()) for t in texts]
    return {
        "mean_words": round(statistics.fmean(words), 1),
        "starts_upper": round(sum(t[:1].isupper() for t in texts) / len(texts), 3),
        "ends_punct": round(sum(t.rstrip()[-1:] in ".!?" for t in texts) / len(texts), 3),
        "assistant_phrases": round(sum(bool(_ASSISTANT.search(t)) for t in texts) / len(texts), 3),
        "empty": sum(1 for t in texts if not t.strip()),
    }


_ASSISTANT = re.compile(
    r"\b(i'?m (a|an) (chatbot|ai|assistant|language model)|happy to help|i can help|"
    r"as an ai|how can i (help|assist))\b",
    re.I,
)


def score(model: AuthorshipModel, member: str, texts: Sequence[str]) -> dict[str, Any]:
    """The member's share of `texts`, and which ones (`hits`, one 1/0 per opening, for paired comparisons)."""
    mid = author_id(member)
    hits = [p == mid for p in model.predict(texts)]
    share = sum(hits) / len(hits) if hits else 0.0
    return {
        "share": round(share, 3),
        "n": len(texts),
        "hits": "".join("1" if h else "0" for h in hits),
        **style_stats(texts),
    }


def paired(a: str, b: str) -> dict[str, Any]:
    """System a's share minus system b's over the same openings, with the paired difference's standard error."""
    if len(a) != len(b) or not a:
        raise ValueError("paired comparison needs the same openings on both sides")
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"difference": round(mean, 3), "se": round(se, 3), "n": len(d)}


def comparisons(systems: Mapping[str, Mapping[str, Any]], reference: str = "plain_peft") -> dict[str, Any]:
    """Every trained system against the reference recipe, paired over the same openings (adapter and hybrid)."""
    ref = systems.get(reference)
    if not ref:
        return {}
    out: dict[str, Any] = {}
    for name, entry in systems.items():
        if name == reference or "adapter" not in entry:
            continue
        out[f"{name} - {reference}"] = {
            mode: paired(entry[mode]["hits"], ref[mode]["hits"]) for mode in ("adapter", "adapter+retrieval")
        }
    return out
