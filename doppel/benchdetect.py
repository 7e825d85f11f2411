"""The honest fidelity benchmark: several members, each judged against the members who write most like them, with
detectability and a 95% interval for every figure (`doppel bench fidelity --members 5`).

Fixed before any method change, and written into every result (`protocol`):
- members: the `members` most active humans of the corpus; contexts: each member's held-out replies (the product's
  own time split, later than all training data), each with the up to `DEPTH` turns before it in its channel, as the
  bot sees them; `openings` of them spread over the held-out period;
- panel: the member and the `PANEL - 1` members whose writing is most similar to theirs (cosine of character 2-4-gram
  TF-IDF profiles over members with at least `MIN_MESSAGES` messages), not the most active ones;
- attribution: the fixed hashed char n-gram SVM of the original harness, over that panel, trained on the panel's
  messages with every held-out reply excluded;
- detectability: `FOLDS`-fold cross-validated accuracy of a char 1-4-gram TF-IDF logistic regression telling a
  system's replies from the member's real replies to the same contexts (50% = indistinguishable);
- replies: as the bot serves them (`auto` mode for what the member has, the bot's temperature and max tokens).
Intervals: Wilson for proportions, a normal interval of the mean for lengths.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from doppel.benchcorpus import BOTS, same_text
from jobspec.attribution import Z95, detectability, wilson

DEPTH = 6
PANEL = 5
MIN_MESSAGES = 300


def mean_interval(xs: Sequence[float]) -> dict[str, Any]:
    """Mean with a normal 95% interval."""
    if not xs:
        return {"mean": None, "ci": None, "n": 0}
    mean = statistics.fmean(xs)
    half = Z95 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("inf")
    return {"mean": round(mean, 2), "ci": [round(mean - half, 2), round(mean + half, 2)], "n": len(xs)}


def shape(texts: Sequence[str]) -> dict[str, Any]:
    """How long replies are and how many lines they take: means with intervals, and the quartiles of length."""
    chars = [len(t.strip()) for t in texts]
    lines = [max(1, len([x for x in t.strip().splitlines() if x.strip()])) for t in texts]
    quart = statistics.quantiles(chars, n=4) if len(chars) > 1 else [float(c) for c in chars * 3]
    multi = sum(1 for n in lines if n > 1)
    return {
        "chars": mean_interval([float(c) for c in chars]),
        "chars_quartiles": [round(q, 1) for q in quart],
        "lines": mean_interval([float(n) for n in lines]),
        "multi_line": {
            "share": round(multi / len(lines), 3) if lines else None,
            "ci": wilson(multi, len(lines)),
        },
    }


def profiles(logs: Sequence[Mapping[str, Any]], min_messages: int) -> dict[str, list[str]]:
    """Each human author's messages, for authors with at least `min_messages` of them."""
    by: dict[str, list[str]] = {}
    for log in logs:
        for _, nick, text in log["lines"]:
            if nick not in BOTS:
                by.setdefault(nick, []).append(text)
    return {n: t for n, t in by.items() if len(t) >= min_messages}


def most_active(logs: Sequence[Mapping[str, Any]], k: int) -> list[str]:
    """The `k` most active humans (ties by name)."""
    counts = Counter(nick for log in logs for _, nick, _ in log["lines"] if nick not in BOTS)
    return [n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def similar_panel(
    authors: Mapping[str, Sequence[str]], member: str, size: int = PANEL, seed: int = 0
) -> list[str]:
    """The member and the `size - 1` authors whose character n-gram profile is closest to theirs (cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if member not in authors:
        raise ValueError(f"{member!r} has too few messages for a profile")
    names = sorted(authors)
    docs = []
    for name in names:
        texts = list(authors[name])
        random.Random(f"{seed}:{name}").shuffle(texts)
        docs.append("\n".join(texts[:800]))  # the same amount of text each: a prolific author is not "closer"
    vec = TfidfVectorizer(
        analyzer="char", ngram_range=(2, 4), sublinear_tf=True, min_df=2, max_features=200_000
    )
    matrix = vec.fit_transform(docs)  # rows are L2-normalised: a dot product is the cosine
    sims = (matrix @ matrix[names.index(member)].T).toarray().ravel()
    # A case variant of the member's nick is the member under another name (`dr_willis`, `Dr_Willis`): never a
    # comparison writer.
    ranked = sorted((-float(s), n) for s, n in zip(sims, names, strict=True) if n.lower() != member.lower())
    return [member, *[n for _, n in ranked[: size - 1]]]


def attribution(judge: Any, member_id: str, texts: Sequence[str]) -> dict[str, Any]:
    """The share of `texts` the panel's judge attributes to the member, with its interval."""
    hits = sum(1 for p in judge.predict(list(texts)) if p == member_id)
    return {
        "share": round(hits / len(texts), 3) if texts else None,
        "ci": wilson(hits, len(texts)),
        "n": len(texts),
    }


def judged(
    judge: Any, member_id: str, texts: Sequence[str], real: Sequence[str], seed: int
) -> dict[str, Any]:
    """Everything the benchmark says of one system's replies for one member."""
    return {
        "attribution": attribution(judge, member_id, texts),
        "detectability": detectability(texts, real, seed),
        "shape": shape(texts),
    }


def pooled(per_member: Mapping[str, Mapping[str, Any]], system: str) -> dict[str, Any]:
    """One system's figures over every member: counts added, then the same intervals."""
    att_k = att_n = det_k = det_n = 0
    for entry in per_member.values():
        got = entry["systems"].get(system)
        if not got:
            continue
        a, d = got["attribution"], got["detectability"]
        att_k += round((a["share"] or 0) * a["n"])
        att_n += a["n"]
        if d["accuracy"] is not None:
            det_k += round(d["accuracy"] * d["n"])
            det_n += d["n"]
    return {
        "attribution": {
            "share": round(att_k / att_n, 3) if att_n else None,
            "ci": wilson(att_k, att_n),
            "n": att_n,
        },
        "detectability": {
            "accuracy": round(det_k / det_n, 3) if det_n else None,
            "ci": wilson(det_k, det_n),
            "n": det_n,
        },
    }


def heldout_contexts(
    turns: Mapping[str, Sequence[Any]], heldout: Sequence[Any], member_id: str, n: int
) -> list[dict[str, Any]]:
    """Each held-out reply of the member with the `DEPTH` turns before it in its channel, spread over the period."""
    by_start = {(t.channel_id, t.start): (k, t) for ch in turns.values() for k, t in enumerate(ch)}
    out = []
    for ex in sorted(heldout, key=lambda e: e.ts):
        found = by_start.get((ex.channel_id, ex.ts))
        if found is None:
            continue
        k, turn = found
        before = list(turns[ex.channel_id][max(0, k - DEPTH) : k])
        if not before or before[-1].author_id == member_id:
            continue  # a reply answers somebody: the member's own follow-up is not an opening
        out.append(
            {
                "context": [(t.author_id, t.author_name, t.text) for t in before],
                "reply": turn.text,
            }
        )
    if len(out) > n:
        step = len(out) / n
        out = [out[int(i * step)] for i in range(n)]
    return out


def banned_texts(heldout: Sequence[Any]) -> set[str]:
    """Every held-out reply as the retrieval filter compares it."""
    return {same_text(ex.target) for ex in heldout}
