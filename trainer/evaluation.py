"""Fidelity metrics: held-out perplexity, style similarity of generated vs real replies (the gate: `jobspec.verdict`)."""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.settings import bundled_embedding_model
from jobspec.errors import EvaluationError

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_EMOJI_RE = re.compile(
    "[\U0001f300-\U0001faff\U0001f1e6-\U0001f1ff\u2600-\u27bf\u2b50\u2b55\u2764\u203c\u2049]"
    r"|:[A-Za-z0-9_]{2,}:|(?<!\w)[:;xX]-?[()DPp3](?!\w)|<3"
)


def perplexity(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 4,
    max_length: int = 2048,
    check: Callable[[], None] | None = None,
) -> float:
    """Per-token perplexity of each row's `completion` given its `prompt` (loss on completion tokens only).

    `check` runs before each batch and may raise (a job told to stop must not finish its evaluation first).
    """
    import torch

    seqs: list[tuple[list[int], int]] = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if not completion:
            continue
        # Over-long rows lose the oldest context, never the reply being scored.
        keep = max(0, max_length - len(completion))
        prompt = prompt[len(prompt) - keep :] if keep else []
        ids = (prompt + completion)[-max_length:]
        seqs.append((ids, len(ids) - min(len(completion), len(ids))))
    if not seqs:
        raise EvaluationError("no held-out replies to measure perplexity on")
    seqs.sort(key=lambda s: len(s[0]))  # similar lengths per batch: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(seqs), max(1, batch_size)):
                if check is not None:
                    check()
                batch = seqs[start : start + max(1, batch_size)]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                for i, (ids, first) in enumerate(batch):
                    input_ids[i, : len(ids)] = torch.tensor(ids)
                    attention[i, : len(ids)] = 1
                    labels[i, first : len(ids)] = torch.tensor(ids[first:])
                nll, n = _completion_nll(model, input_ids.to(device), attention.to(device), labels.to(device))
                total += nll
                count += n
    finally:
        if was_training:
            model.train()
    if count == 0:
        raise EvaluationError("held-out replies have no scorable tokens")
    return math.exp(total / count)


def _completion_nll(model: Any, input_ids: Any, attention: Any, labels: Any) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens and their count; logits only where a label is."""
    import torch.nn.functional as F

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = causal.config.get_text_config()
    from jobspec.memory import head_chunk
    from trainer.lmhead import _LOGIT_TRANSFORMS

    if any(getattr(text_config, name, None) is not None for name in _LOGIT_TRANSFORMS):
        # Soft-capped or scaled logits: the model's own head applies them (whole-batch logits, as before).
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        return float(nll), int((targets != -100).sum())
    hidden = causal.get_decoder()(
        input_ids=input_ids, attention_mask=attention, use_cache=False
    ).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    picked, wanted = hidden[:, :-1][mask], targets[mask]
    del hidden
    head = causal.get_output_embeddings()
    # A chunk of positions at a time (`jobspec.memory.head_chunk`): the whole batch's logits at 4 x 2048 tokens
    # were 1.6 GB for SmolLM2 (49,152 tokens) and twice that again as their float copy and log-softmax.
    size = head_chunk(int(head.weight.shape[0]))
    total = 0.0
    for start in range(0, picked.shape[0], size):
        logits = head(picked[start : start + size]).float()
        total += float(F.cross_entropy(logits, wanted[start : start + size], reduction="sum"))
    return total, int(wanted.numel())


def load_embedder(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 sentence-transformers model (offline), or None when not installed."""
    folder = bundled_embedding_model()
    if folder is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device=device)


def embedding_similarity(embedder: Any, generated: Sequence[str], real: Sequence[str]) -> dict[str, float]:
    """Mean cosine of paired replies and cosine of the two sets' centroids (normalised embeddings)."""
    import numpy as np

    gen = np.asarray(embedder.encode(list(generated), normalize_embeddings=True, show_progress_bar=False))
    ref = np.asarray(embedder.encode(list(real), normalize_embeddings=True, show_progress_bar=False))
    out: dict[str, float] = {}
    if len(gen) == len(ref):
        out["embedding_cosine"] = float(np.mean(np.sum(gen * ref, axis=1)))
    a, b = gen.mean(axis=0), ref.mean(axis=0)
    out["centroid_cosine"] = float(a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))
    return out


def length_distance(generated: Sequence[str], real: Sequence[str]) -> dict[str, float]:
    """Wasserstein-1 (in characters) and Kolmogorov-Smirnov statistic between reply-length distributions."""
    import numpy as np

    a = np.sort(np.array([len(t) for t in generated], dtype=float))
    b = np.sort(np.array([len(t) for t in real], dtype=float))
    grid = np.unique(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    gaps = np.diff(grid)
    wasserstein = float(np.sum(np.abs(cdf_a - cdf_b)[:-1] * gaps)) if len(grid) > 1 else 0.0
    return {"length_wasserstein": wasserstein, "length_ks": float(np.max(np.abs(cdf_a - cdf_b)))}


def vocabulary_overlap(generated: Sequence[str], real: Sequence[str]) -> float:
    """Jaccard overlap of the lower-cased word sets."""
    a = {w for t in generated for w in _WORD_RE.findall(t.casefold())}
    b = {w for t in real for w in _WORD_RE.findall(t.casefold())}
    return len(a & b) / len(a | b) if a | b else 1.0


def style_rates(texts: Sequence[str]) -> dict[str, float]:
    """Emoji per message, punctuation per character, capital letters per letter, mean length in characters."""
    chars = sum(len(t) for t in texts) or 1
    letters = [c for t in texts for c in t if c.isalpha()]
    punct = sum(1 for t in texts for c in t if unicodedata.category(c).startswith("P"))
    return {
        "emoji_rate": sum(len(_EMOJI_RE.findall(t)) for t in texts) / max(1, len(texts)),
        "punctuation_rate": punct / chars,
        "caps_rate": sum(c.isupper() for c in letters) / max(1, len(letters)),
        "mean_length": chars / max(1, len(texts)) if any(texts) else 0.0,
    }


def style_metrics(generated: Sequence[str], real: Sequence[str], embedder: Any = None) -> dict[str, Any]:
    """How close generated replies are to the real ones in meaning, length, vocabulary and surface style."""
    if not generated or not real:
        raise EvaluationError("style metrics need at least one generated and one real reply")
    out: dict[str, Any] = {"n": len(generated)}
    if embedder is not None:
        out.update(embedding_similarity(embedder, generated, real))
    out.update(length_distance(generated, real))
    out["vocab_jaccard"] = vocabulary_overlap(generated, real)
    gen, ref = style_rates(generated), style_rates(real)
    for key in gen:
        out[key] = gen[key]
        out[f"{key}_real"] = ref[key]
        out[f"{key}_diff"] = abs(gen[key] - ref[key])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def fidelity_report(
    generated: Sequence[str],
    real: Sequence[str],
    *,
    base: Sequence[str] | None = None,
    retrieval: Sequence[str] | None = None,
    attribution_rows: Sequence[Mapping[str, Any]] | None = None,
    member_id: str | None = None,
    embedder: Any = None,
    load_embeddings: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Style metrics (and authorship attribution) of the adapter's replies, and of base / retrieval-only when given."""
    if embedder is None and load_embeddings:
        embedder = load_embedder()
    systems = {"adapter": generated, "base": base, "retrieval": retrieval}
    report: dict[str, Any] = {
        "n_real": len(real),
        "embedding_model": "all-MiniLM-L6-v2" if embedder else None,
    }
    report["style"] = {name: style_metrics(texts, real, embedder) for name, texts in systems.items() if texts}
    if attribution_rows and member_id:
        from jobspec.attribution import attribution_report

        report["attribution"] = attribution_report(
            attribution_rows,
            {name: list(texts) for name, texts in systems.items() if texts},
            member_id,
            real_heldout=list(real),
            seed=seed,
        )
    return report
