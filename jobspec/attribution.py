"""Authorship attribution: a character n-gram classifier over a bounded panel of consenting members' real messages.

Memory is bounded whatever the community size: the dataset builder sends a panel (the member plus at most
`jobs.dataset.PANEL_OTHERS` comparison members, capped messages each), features are hashed into a fixed
`N_FEATURES` space (no vocabulary that grows with the text), and the linear SVM (liblinear) fits one class against
the rest at a time, so it holds one weight vector per class and never the several classes x features copies that
a multinomial lbfgs fit keeps.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobspec.errors import EvaluationError

MIN_PER_AUTHOR = 3
# 2**18 hashed char n-grams: collisions are rare at a panel's size, and the weights stay under 40 MB for 17 classes.
N_FEATURES = 2**18
# The panel: the member and this many comparison members (the most active), so chance is 1/17 in any community
# big enough, and the fit costs the same for 20 members or 20,000.
PANEL_OTHERS = 16
PANEL_PER_AUTHOR = 200
# Detectability: folds of the cross-validation, and the normal quantile of a 95% interval.
FOLDS = 5
Z95 = 1.959964


def choose_panel(counts: Mapping[str, int], member_id: str | None, others: int = PANEL_OTHERS) -> list[str]:
    """The member (first) plus the `others` most active authors with enough messages; ties go to the lower id."""
    ranked = sorted(
        (a for a, n in counts.items() if a != member_id and n >= MIN_PER_AUTHOR),
        key=lambda a: (-counts[a], a),
    )
    own = [member_id] if member_id and counts.get(member_id, 0) > 0 else []
    # Without a member (the multi-persona adapter) the panel is the most active authors overall.
    return own + ranked[: others + (0 if member_id else 1)]


def panel_rows(
    rows: Sequence[Mapping[str, Any]],
    member_id: str | None,
    *,
    others: int = PANEL_OTHERS,
    per_author: int = PANEL_PER_AUTHOR,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The rows of the panel only, at most `per_author` each (a seeded sample): what the classifier may see."""
    by_author: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if str(r.get("text", "")).strip():
            by_author.setdefault(str(r["author_id"]), []).append(r)
    keep = choose_panel({a: len(v) for a, v in by_author.items()}, member_id, others)
    out: list[dict[str, Any]] = []
    for author in keep:
        own = by_author[author]
        if len(own) > per_author:
            own = random.Random(f"{seed}:attr:{author}").sample(own, per_author)
        out.extend(dict(r) for r in own)
    return out


@dataclass(frozen=True)
class AuthorshipModel:
    """A fitted hashed TF-IDF char 2-4-gram + linear SVM pipeline and its accuracy on held-out real messages."""

    pipeline: Any
    authors: tuple[str, ...]
    accuracy: float
    test_size: int

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely author id of each text."""
        return [str(a) for a in self.pipeline.predict(list(texts))] if texts else []

    def share(self, texts: Sequence[str], author_id: str) -> float:
        """Fraction of `texts` attributed to `author_id`."""
        predicted = self.predict(texts)
        return sum(p == author_id for p in predicted) / len(predicted) if predicted else 0.0


def train_authorship(
    rows: Sequence[Mapping[str, Any]], *, seed: int = 0, test_fraction: float = 0.2
) -> AuthorshipModel:
    """Fit on a stratified share of the rows (`author_id`, `text`) and measure accuracy on the rest."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    counts = Counter(str(r["author_id"]) for r in rows if str(r.get("text", "")).strip())
    usable = [
        r for r in rows if counts[str(r["author_id"])] >= MIN_PER_AUTHOR and str(r.get("text", "")).strip()
    ]
    authors = sorted({str(r["author_id"]) for r in usable})
    if len(authors) < 2:
        raise EvaluationError(
            f"authorship needs at least two members with {MIN_PER_AUTHOR}+ messages; found {len(authors)}"
        )
    texts = [str(r["text"]) for r in usable]
    labels = [str(r["author_id"]) for r in usable]
    test_n = max(len(authors), round(len(usable) * test_fraction))
    train_x, test_x, train_y, test_y = train_test_split(
        texts, labels, test_size=test_n, stratify=labels, random_state=seed
    )
    pipeline = make_pipeline(
        # Case and punctuation are style, so nothing is lower-cased; word-bounded n-grams keep spacing habits.
        HashingVectorizer(
            analyzer="char_wb",
            ngram_range=(2, 4),
            lowercase=False,
            n_features=N_FEATURES,
            alternate_sign=False,
            norm=None,
        ),
        TfidfTransformer(sublinear_tf=True),
        # Balanced classes: a chatty member must not win every vote, or "share vs chance" means nothing.
        LinearSVC(C=0.5, class_weight="balanced", max_iter=5000, random_state=seed),
    )
    pipeline.fit(train_x, train_y)
    accuracy = float(sum(p == y for p, y in zip(pipeline.predict(test_x), test_y, strict=True)) / len(test_y))
    return AuthorshipModel(pipeline, tuple(authors), accuracy, len(test_y))


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def detectability(system: Sequence[str], real: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """How often a classifier tells `system`'s replies from the member's `real` ones (cross-validated, 50% = not)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline

    texts = [t.strip() or "<empty>" for t in [*system, *real]]
    labels = [1] * len(system) + [0] * len(real)
    folds = min(FOLDS, len(system), len(real))
    if folds < 2:
        return {"accuracy": None, "ci": None, "n": len(texts)}
    correct = 0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(texts, labels):
        model = make_pipeline(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, lowercase=False),
            LogisticRegression(C=4.0, max_iter=2000),
        )
        model.fit([texts[i] for i in train], [labels[i] for i in train])
        got = model.predict([texts[i] for i in test])
        correct += sum(int(g == labels[i]) for g, i in zip(got, test, strict=True))
    return {"accuracy": round(correct / len(texts), 3), "ci": wilson(correct, len(texts)), "n": len(texts)}


def attribution_report(
    rows: Sequence[Mapping[str, Any]],
    generated: Mapping[str, Sequence[str]] | Sequence[str],
    member_id: str,
    *,
    real_heldout: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of each system's generations attributed to the member, against chance (1 / panel size)."""
    systems = {"adapter": list(generated)} if not isinstance(generated, Mapping) else dict(generated)
    # Job folders already hold only the panel; choosing it again bounds the fit for any caller's rows.
    rows = panel_rows(rows, member_id, seed=seed)
    try:
        model = train_authorship(rows, seed=seed)
    except EvaluationError as exc:
        return {"available": False, "reason": str(exc)}
    if member_id not in model.authors:
        return {
            "available": False,
            "reason": f"member {member_id} has too few real messages for the classifier",
        }
    chance = 1.0 / len(model.authors)
    share = {name: round(model.share(texts, member_id), 4) for name, texts in systems.items() if texts}
    report: dict[str, Any] = {
        "available": True,
        "members": len(model.authors),
        "panel": len(model.authors),
        "panel_rule": f"the member and the {len(model.authors) - 1} most active other members",
        "chance": round(chance, 4),
        "accuracy": round(model.accuracy, 4),
        "test_size": model.test_size,
        "share": share,
        "lift": {name: round(value / chance, 3) for name, value in share.items()},
    }
    # Every share with its 95% interval: a job's few samples say less than they seem to.
    report["share_ci"] = {
        name: wilson(round(share[name] * len(texts)), len(texts)) for name, texts in systems.items() if texts
    }
    if real_heldout:
        # The ceiling a perfect persona could reach: how often the member's own unseen replies are recognised.
        report["real_heldout_share"] = round(model.share(real_heldout, member_id), 4)
        # How often a classifier tells the replies from the member's real ones (50%: it cannot).
        report["detectability"] = {
            name: detectability(texts, real_heldout, seed) for name, texts in systems.items() if texts
        }
    return report
