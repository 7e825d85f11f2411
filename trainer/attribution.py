"""Authorship attribution: a character n-gram classifier over consenting members' real messages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.errors import EvaluationError

MIN_PER_AUTHOR = 3


@dataclass(frozen=True)
class AuthorshipModel:
    """A fitted TF-IDF char 2-4-gram + logistic regression pipeline and its accuracy on held-out real messages."""

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


def train_authorship(rows: Sequence[Mapping[str, Any]], *, seed: int = 0, test_fraction: float = 0.2) -> AuthorshipModel:
    """Fit on a stratified share of the rows (`author_id`, `text`) and measure accuracy on the rest."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    counts = Counter(str(r["author_id"]) for r in rows if str(r.get("text", "")).strip())
    usable = [r for r in rows if counts[str(r["author_id"])] >= MIN_PER_AUTHOR and str(r.get("text", "")).strip()]
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
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=False, sublinear_tf=True,
                        min_df=1, max_features=100_000),
        # Balanced classes: a chatty member must not win every vote, or "share vs chance" means nothing.
        LogisticRegression(C=5.0, max_iter=2000, class_weight="balanced"),
    )
    pipeline.fit(train_x, train_y)
    accuracy = float(sum(p == y for p, y in zip(pipeline.predict(test_x), test_y, strict=True)) / len(test_y))
    return AuthorshipModel(pipeline, tuple(authors), accuracy, len(test_y))


def attribution_report(
    rows: Sequence[Mapping[str, Any]],
    generated: Mapping[str, Sequence[str]] | Sequence[str],
    member_id: str,
    *,
    real_heldout: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Share of each system's generations attributed to the member, against chance (1 / members)."""
    systems = {"adapter": list(generated)} if not isinstance(generated, Mapping) else dict(generated)
    try:
        model = train_authorship(rows, seed=seed)
    except EvaluationError as exc:
        return {"available": False, "reason": str(exc)}
    if member_id not in model.authors:
        return {"available": False, "reason": f"member {member_id} has too few real messages for the classifier"}
    chance = 1.0 / len(model.authors)
    share = {name: round(model.share(texts, member_id), 4) for name, texts in systems.items() if texts}
    report: dict[str, Any] = {
        "available": True,
        "members": len(model.authors),
        "chance": round(chance, 4),
        "accuracy": round(model.accuracy, 4),
        "test_size": model.test_size,
        "share": share,
        "lift": {name: round(value / chance, 3) for name, value in share.items()},
    }
    if real_heldout:
        # The ceiling a perfect persona could reach: how often the member's own unseen replies are recognised.
        report["real_heldout_share"] = round(model.share(real_heldout, member_id), 4)
    return report
