"""Trainer benchmarks (`doppel bench dataset`, `doppel bench train`): JSON results, measured on generated data.

The training side runs in a trainer child (`trainer/bench.py`); the dataset side is the control plane's, here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.settings import Settings

# -- dataset ----------------------------------------------------------------------------------------------------
_WORDS = (
    "game tonight server build patch raid boss map queue team loot level music movie pizza work bug fix deploy "
    "coffee weekend train rain cat dog meme stream clip lag ping code review lunch party beach book"
).split()
_TAILS = ("", "", " lol", " :)", "!!!", " 😂", "?", " ngl", " tbh", "...")
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def dataset(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Build persona datasets from a generated store: examples/s single and multi-persona, token padding stats."""
    quick = bool(getattr(args, "quick", False))
    n_messages = 4_000 if quick else 20_000
    n_members = 8
    with tempfile.TemporaryDirectory(prefix="doppel-bench-dataset-") as tmp:
        bench_settings = replace(settings, home=Path(tmp), master_key=None)
        return asyncio.run(_dataset_bench(bench_settings, n_messages, n_members))


async def _dataset_bench(settings: Settings, n_messages: int, n_members: int) -> dict[str, Any]:
    from data.crypto import job_key_for
    from data.records import Member
    from data.store import Store
    from jobs.dataset import materialize

    chat_format, tokenize, fmt_source = _format_and_tokenizer(settings)
    messages = _generate(n_messages, n_members, seed=settings.dataset.seed)
    async with Store.open(settings) as store:
        async with store.write() as db:
            for m in range(n_members):
                await db.execute(
                    "INSERT INTO consent(member_id, scope, granted_at, actor, channel) VALUES (?, 'train', 0, ?, 'cli')",
                    (_member_id(m), "bench"),
                )
        for m in range(n_members):
            await store.members.upsert(Member(_member_id(m), f"user{m}", f"User {m}"))
        t0 = time.perf_counter()
        for start in range(0, len(messages), 2000):
            await store.messages.add_many(messages[start : start + 2000])
        store_s = time.perf_counter() - t0
        member = _member_id(0)
        runs: dict[str, Any] = {}
        for name, kwargs in (("single", {"mode": "sft+dpo"}), ("multi", {"multi": True})):
            job = settings.jobs_dir / name
            t0 = time.perf_counter()
            meta = await materialize(
                store, settings, member if name == "single" else "", job, chat_format, **kwargs
            )
            seconds = time.perf_counter() - t0
            counts = meta["counts"]
            examples = counts["train"] + counts["val"] + counts["heldout"]
            runs[name] = {
                "seconds": round(seconds, 3),
                "examples": examples,
                "examples_per_s": round(examples / seconds, 1),
                "dpo_pairs": counts["dpo"],
                "kto_rows": counts["kto"],
                "dropped": counts["dropped"],
            }
            if tokenize is not None:
                runs[name]["tokens"] = _padding_stats(
                    job / "dataset" / "train.jsonl",
                    tokenize,
                    settings.dataset.seed,
                    key=job_key_for(settings, job),
                )
    return {
        "messages": n_messages,
        "members": n_members,
        "store_insert_s": round(store_s, 3),
        "chat_format": fmt_source,
        "single": runs["single"],
        "multi": runs["multi"],
    }


def _member_id(i: int) -> str:
    return str(100_000_000_000_000_000 + i)


def _generate(n: int, n_members: int, seed: int) -> list[Any]:
    from data.records import Message

    rng = random.Random(seed)
    # Zipf-like activity: a few members talk most, as in real servers.
    weights = [1.0 / (i + 1) for i in range(n_members)]
    channels = [(str(900 + c), f"channel-{c}") for c in range(6)]
    t = 1_700_000_000.0
    out = []
    for i in range(n):
        t += rng.expovariate(1 / 90.0)  # a message every 90 s on average: bursts merge, pauses split context
        author = rng.choices(range(n_members), weights)[0]
        channel_id, channel_name = rng.choice(channels)
        words = " ".join(rng.choices(_WORDS, k=rng.randint(1, 14)))
        extra = rng.random()
        if extra < 0.03:
            words += f" mail me at user{author}@example.com"
        elif extra < 0.06:
            words += f" https://example.com/watch?v={rng.getrandbits(40):x}"
        elif extra < 0.09:
            words = f"<@{_member_id(rng.randrange(n_members))}> {words}"
        reactions = {"😂": rng.randint(1, 5)} if rng.random() < 0.15 else {}
        out.append(
            Message(
                id=str(1_000_000_000_000_000_000 + i),
                guild_id="1",
                channel_id=channel_id,
                channel_name=channel_name,
                author_id=_member_id(author),
                author_name=f"user{author}",
                created_at=t,
                content=words + rng.choice(_TAILS),
                reactions=reactions,
                attachments=1 if rng.random() < 0.02 else 0,
            )
        )
    return out


def _format_and_tokenizer(settings: Settings) -> tuple[Any, Any, str]:
    from core.chatformat import ChatFormat

    try:
        path = settings.base_gguf_path()
        fmt = ChatFormat.from_gguf(path)
    except Exception:
        return ChatFormat(template=_CHATML, eos_token="<|im_end|>"), None, "chatml (no base model)"
    try:
        from llama_cpp import Llama

        # vocab_only loads the tokenizer without the weights: cheap enough for token-length statistics.
        with _quiet_stderr():
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)

        def tokenize(text: str) -> int:
            return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    except Exception:
        return fmt, None, path.name
    return fmt, tokenize, path.name


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # llama.cpp logs from C straight to fd 2, past Python's sys.stderr; the bench's JSON output stays clean.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _padding_stats(
    train_jsonl: Path, tokenize: Any, seed: int, batch: int = 8, key: bytes | None = None
) -> dict[str, Any]:
    from jobspec.jobdata import read_jsonl

    lengths = [tokenize(row["prompt"] + row["completion"]) for row in read_jsonl(train_jsonl, key=key)]
    if not lengths:
        return {}

    def padding(order: list[int]) -> float:
        real = padded = 0
        for i in range(0, len(order), batch):
            chunk = order[i : i + batch]
            real += sum(chunk)
            padded += max(chunk) * len(chunk)
        return round(1 - real / padded, 4) if padded else 0.0

    shuffled = lengths[:]
    random.Random(seed).shuffle(shuffled)
    return {
        "count": len(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "p50": int(statistics.median(lengths)),
        "p95": int(sorted(lengths)[int(0.95 * (len(lengths) - 1))]),
        "max": max(lengths),
        "padding_fraction_random_batches": padding(shuffled),
        "padding_fraction_length_grouped": padding(sorted(lengths)),
        "batch_size": batch,
    }


# -- train ------------------------------------------------------------------------------------------------------
def train(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Trained (non-pad) tokens/s and padding fraction: our SFT pipeline vs plain HF Trainer + PEFT, same data.

    Measured in a trainer child (`python -m trainer bench-train`, trainer/bench.py): torch stays out of the shell.
    """
    from doppel.benchchild import trainer_result

    if getattr(args, "quick", False):
        return trainer_result("bench-train", "--quick", what="bench train")
    gguf = settings.base_gguf_path()
    cache = settings.cache_dir / "base-models"
    return trainer_result(
        "bench-train", "--base-gguf", str(gguf), "--cache-dir", str(cache), what="bench train"
    )
