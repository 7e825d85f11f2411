"""Reading a job folder's dataset files (sealed with the job's key) and fitting examples into the token budget.

The dataset files are encrypted at rest with a per-job key (`data.crypto.job_key`): HKDF of the master key and the job id, derived by
the parent (which writes them) and handed to the child on its stdin, so the key never touches the disk and a
host crash mid-job leaves nothing readable without the master key. Only the process environment would be
simpler, but another process of the same user can read a child's environment through /proc; a pipe it cannot.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from core.chatformat import ChatFormat
from jobspec.errors import JobConfigError

SEALED_MAGIC = b"DOPPEL-SEALED-1\n"
KEY_BYTES = 32
NONCE_BYTES = 12
# For executors without a stdin to write to (Ray): weaker, since an environment is visible to the same user.
KEY_ENV = "DOPPEL_JOB_KEY"
# The supervisor's pid, so the child stops when its supervisor dies (`trainer.lifeline`).
SUPERVISOR_PID_ENV = "DOPPEL_SUPERVISOR_PID"


def seal_bytes(key: bytes, data: bytes, name: str) -> bytes:
    """AES-GCM of a whole file, its name as associated data (a file cannot be swapped for another)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return SEALED_MAGIC + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def is_sealed(path: Path) -> bool:
    """True when the file is a sealed dataset file."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(SEALED_MAGIC)) == SEALED_MAGIC
    except OSError:
        return False


def open_bytes(path: Path, key: bytes | None) -> bytes:
    """A dataset file's plaintext: sealed files need the job key; plain ones (tests, hand-made jobs) are read as is."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = path.read_bytes()
    if not raw.startswith(SEALED_MAGIC):
        return raw
    if key is None:
        raise JobConfigError(f"{path.name}: the dataset is encrypted and no job key was given on stdin")
    body = raw[len(SEALED_MAGIC) :]
    try:
        return AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], path.name.encode())
    except InvalidTag:
        raise JobConfigError(f"{path.name}: the job key does not open the dataset") from None


def dataset_sealed(job_dir: Path) -> bool:
    """True when any dataset file of the job folder is sealed (the child then needs the key)."""
    ds = job_dir / "dataset"
    return ds.is_dir() and any(is_sealed(p) for p in ds.glob("*.jsonl"))


def read_key(stream: IO[bytes] | None) -> bytes | None:
    """The job key: one hex line on `stream` (the parent's pipe), else `DOPPEL_JOB_KEY`; None when neither."""
    line = b""
    if stream is not None:
        try:
            line = stream.readline(4 * KEY_BYTES).strip()
        except (OSError, ValueError):
            line = b""
    text = line.decode("ascii", "replace") if line else os.environ.pop(KEY_ENV, "")
    if not text:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise JobConfigError("the job key must be hex") from None
    if len(key) != KEY_BYTES:
        raise JobConfigError(f"the job key must be {KEY_BYTES} bytes")
    return key


@dataclass
class JobData:
    """The splits of one job folder, as rows of the dataset contract."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]] = field(default_factory=list)
    heldout: list[dict[str, Any]] = field(default_factory=list)
    preference: list[dict[str, Any]] = field(default_factory=list)
    attribution: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def read_jsonl(
    path: Path, required: tuple[str, ...] = ("prompt", "completion"), key: bytes | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (sealed or plain); a missing file is empty, a bad line is a one-line error naming it."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    text = open_bytes(path, key).decode("utf-8")
    # Only "\n" ends a row: ensure_ascii=False leaves U+2028 and friends inside strings, which splitlines() splits.
    for n, line in enumerate(text.split("\n"), 1):
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


def load_job_data(job_dir: Path, key: bytes | None = None, *, need_train: bool = True) -> JobData:
    """Read JOB_DIR/dataset/{train,val,heldout,preference,attribution}.jsonl (opened with `key`) and meta.json."""
    ds = job_dir / "dataset"
    if need_train and not (ds / "train.jsonl").exists():
        raise JobConfigError(
            f"{ds / 'train.jsonl'}: not found (the supervisor materializes the dataset first)"
        )
    train = read_jsonl(ds / "train.jsonl", key=key)
    if need_train and not train:
        raise JobConfigError(f"{ds / 'train.jsonl'}: no training examples")
    meta: dict[str, Any] = {}
    if (ds / "meta.json").exists():
        try:
            meta = json.loads((ds / "meta.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise JobConfigError(f"{ds / 'meta.json'}: invalid JSON: {exc.msg}") from None
    return JobData(
        train=train,
        val=read_jsonl(ds / "val.jsonl", key=key),
        heldout=read_jsonl(ds / "heldout.jsonl", key=key),
        preference=read_jsonl(ds / "preference.jsonl", required=("prompt",), key=key),
        attribution=read_jsonl(ds / "attribution.jsonl", required=("author_id", "text"), key=key),
        meta=meta,
    )


def job_format(cfg: Any) -> ChatFormat | None:
    """The chat format the job's dataset was rendered with (the base's, or the one chosen at add-base)."""
    try:
        return ChatFormat.for_config(cfg.to_dict())
    except (ValueError, OSError):
        return None


def fit_rows(
    rows: list[dict[str, Any]], tokenizer: Any, max_length: int, fmt: ChatFormat | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Rows whose prompt+completion fit `max_length` tokens, dropping the oldest context turns where needed.

    Truncating the token sequence instead would cut either the system prompt or the reply's end-of-turn token;
    re-rendering with fewer context turns keeps both. `fmt` is the job's chat format (`job_format`), so a base
    without a template of its own is re-rendered in the format it was trained and is served in; without it the
    tokenizer's template is used. Returns (fitted rows, number dropped as unfittable).
    """
    if fmt is None and getattr(tokenizer, "chat_template", None):
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


def fit_pairs(
    pairs: list[dict[str, Any]], tokenizer: Any, max_length: int, fmt: ChatFormat | None = None
) -> tuple[list[dict[str, Any]], int]:
    """DPO pairs fitted like `fit_rows`, by the longer of the two replies: both must fit under one prompt."""
    fitted: list[dict[str, Any]] = []
    dropped = 0
    for pair in pairs:
        longer = max(
            (pair["chosen"], pair["rejected"]),
            key=lambda c: len(tokenizer(c, add_special_tokens=False)["input_ids"]),
        )
        rows, lost = fit_rows([{**pair, "completion": longer}], tokenizer, max_length, fmt)
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
