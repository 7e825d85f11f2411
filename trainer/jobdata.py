"""Reading a job folder's dataset files and fitting examples into the token budget."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import JobConfigError


@dataclass
class JobData:
    """The splits of one job folder, as rows of the dataset contract."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]] = field(default_factory=list)
    heldout: list[dict[str, Any]] = field(default_factory=list)
    preference: list[dict[str, Any]] = field(default_factory=list)
    attribution: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: Path, required: tuple[str, ...] = ("prompt", "completion")) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a missing file is empty, a bad line is a one-line error naming it."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JobConfigError(f"{path.name}:{n}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise JobConfigError(f"{path.name}:{n}: expected a JSON object")
            missing = [k for k in required if not isinstance(row.get(k), str)]
            if missing:
                raise JobConfigError(f"{path.name}:{n}: missing string field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def load_job_data(job_dir: Path) -> JobData:
    """Read JOB_DIR/dataset/{train,val,heldout,preference}.jsonl and meta.json."""
    ds = job_dir / "dataset"
    if not (ds / "train.jsonl").exists():
        raise JobConfigError(f"{ds / 'train.jsonl'}: not found (the supervisor materializes the dataset first)")
    train = read_jsonl(ds / "train.jsonl")
    if not train:
        raise JobConfigError(f"{ds / 'train.jsonl'}: no training examples")
    meta: dict[str, Any] = {}
    if (ds / "meta.json").exists():
        try:
            meta = json.loads((ds / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise JobConfigError(f"{ds / 'meta.json'}: invalid JSON: {exc.msg}") from None
    return JobData(
        train=train,
        val=read_jsonl(ds / "val.jsonl"),
        heldout=read_jsonl(ds / "heldout.jsonl"),
        preference=read_jsonl(ds / "preference.jsonl", required=("prompt",)),
        attribution=read_jsonl(ds / "attribution.jsonl", required=("author_id", "text")),
        meta=meta,
    )


def fit_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Rows whose prompt+completion fit `max_length` tokens, dropping the oldest context turns where needed.

    Truncating the token sequence instead would cut either the system prompt or the reply's end-of-turn token;
    re-rendering with fewer context turns keeps both. Returns (fitted rows, number dropped as unfittable).
    """
    from doppel.chatformat import ChatFormat

    fmt: ChatFormat | None = None
    if getattr(tokenizer, "chat_template", None):
        fmt = ChatFormat.from_tokenizer(tokenizer)
    out: list[dict[str, Any]] = []
    dropped = 0
    for row in rows:
        prompt, completion = row["prompt"], row["completion"]
        n = len(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
        messages = list(row.get("messages") or [])
        while n > max_length and fmt is not None and _drop_oldest(messages):
            prompt = fmt.prompt(messages)
            n = len(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
        if n > max_length:
            dropped += 1
            continue
        out.append({**row, "prompt": prompt, "messages": messages, "n_tokens": n})
    return out, dropped


def fit_pairs(pairs: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, Any]], int]:
    """DPO pairs fitted like `fit_rows`, by the longer of the two replies: both must fit under one prompt."""
    fitted: list[dict[str, Any]] = []
    dropped = 0
    for pair in pairs:
        longer = max((pair["chosen"], pair["rejected"]),
                     key=lambda c: len(tokenizer(c, add_special_tokens=False)["input_ids"]))
        rows, lost = fit_rows([{**pair, "completion": longer}], tokenizer, max_length)
        dropped += lost
        fitted.extend({k: v for k, v in row.items() if k != "completion"} for row in rows)
    return fitted, dropped


def _drop_oldest(messages: list[dict[str, str]]) -> bool:
    """Remove the oldest context: a whole turn, or the first line of a merged multi-speaker user turn."""
    # messages[0] is the system prompt and the last turn is what the reply answers: both stay.
    if len(messages) > 2:
        messages.pop(1)
        return True
    if len(messages) == 2 and "\n" in messages[1]["content"]:
        messages[1] = {**messages[1], "content": messages[1]["content"].split("\n", 1)[1]}
        return True
    return False


def weighted_rows(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Apply each row's `weight` (reaction weighting, 1.0-1.5x) by seeded oversampling: expected copies = weight."""
    rng = random.Random(f"{seed}:weights")
    out: list[dict[str, Any]] = []
    for row in rows:
        weight = float(row.get("weight", 1.0) or 0.0)
        copies = int(weight) + (1 if rng.random() < weight - int(weight) else 0)
        out.extend([row] * copies)
    return out
