"""Persona training examples built from stored messages, and their atomic materialisation into a job folder."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.chatformat import DEFAULT_STYLE, ChatFormat, Utterance, build_messages, with_examples
from core.settings import DatasetSettings, Settings
from data.records import Message
from jobs.errors import DatasetError, NotEnoughExamplesError
from jobs.preference import feedback_rows, preference_rows
from jobspec.attribution import PANEL_OTHERS, PANEL_PER_AUTHOR, choose_panel
from jobspec.cleaning import Cleaner, normalize
from jobspec.config import MODES
from jobspec.example import Example

# Long identical replies are copy-pastes or spam; short ones ("lol") are the member's style and stay.
_COPYPASTE_CHARS = 20


@dataclass(frozen=True)
class Turn:
    """Consecutive messages of one author in one channel, merged into what they meant as one message."""

    author_id: str
    author_name: str
    channel_id: str
    channel_name: str | None
    start: float
    end: float
    text: str
    message_ids: tuple[str, ...]
    reactions: int = 0
    reply_to: str | None = None


@dataclass
class Dataset:
    """Everything `materialize` writes: the three splits, preference and attribution rows, and counts."""

    member_id: str
    multi: bool
    mode: str
    train: list[Example]
    val: list[Example]
    heldout: list[Example]
    preference: list[dict[str, Any]]
    attribution: list[dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def lineage(self) -> list[str]:
        """Member ids whose words appear in any example (what an adapter trained on it derives from)."""
        return sorted({m for ex in (*self.train, *self.val, *self.heldout) for m in ex.members})

    def meta(self, settings: DatasetSettings) -> dict[str, Any]:
        """meta.json: member, lineage, time window and counts."""
        every = [*self.train, *self.val, *self.heldout]
        per_member = Counter(ex.member_id for ex in self.train)
        kinds = Counter(row["kind"] for row in self.preference)
        return {
            "member": None if self.multi else self.member_id,
            "multi": self.multi,
            "mode": self.mode,
            "lineage": self.lineage,
            # Everyone whose text is anywhere in the folder: the erasure cascade deletes the folder for any of them.
            "contains": sorted(set(self.lineage) | {row["author_id"] for row in self.attribution}),
            "window": {
                "start": min((ex.ts for ex in every), default=None),
                "end": max((ex.ts for ex in every), default=None),
                "heldout_from": min((ex.ts for ex in self.heldout), default=None),
            },
            "counts": {
                "train": len(self.train),
                "val": len(self.val),
                "heldout": len(self.heldout),
                "kto": kinds.get("kto", 0),
                "dpo": kinds.get("dpo", 0),
                "attribution": len(self.attribution),
                "attribution_panel": len({row["author_id"] for row in self.attribution}),
                "train_per_member": dict(sorted(per_member.items())),
                "dropped": dict(sorted(self.dropped.items())),
            },
            "settings": asdict(settings),
        }


def build_turns(
    messages: Iterable[Message],
    cleaner: Cleaner,
    merge_gap_s: float,
    *,
    allowed: set[str] | None = None,
    dropped: Counter[str] | None = None,
) -> dict[str, list[Turn]]:
    """Clean messages and merge each author's consecutive messages (within `merge_gap_s`) per channel."""
    dropped = Counter() if dropped is None else dropped
    by_channel: dict[str, list[Message]] = defaultdict(list)
    for msg in messages:
        if allowed is not None and msg.author_id not in allowed:
            dropped["not_allowed"] += 1
            continue
        by_channel[msg.channel_id].append(msg)
    turns: dict[str, list[Turn]] = {}
    for channel_id, msgs in by_channel.items():
        msgs.sort(key=lambda m: (m.created_at, _id_order(m.id)))
        out: list[Turn] = []
        for msg in msgs:
            text = cleaner.message(msg.content)
            if text is None:
                dropped[
                    "attachment_only" if msg.attachments and not msg.content.strip() else "empty_or_link"
                ] += 1
                continue
            reactions = sum(max(0, int(n)) for n in msg.reactions.values())
            last = out[-1] if out else None
            if last and last.author_id == msg.author_id and msg.created_at - last.end <= merge_gap_s:
                # A double post of the same line is one thought, not two.
                joined = last.text if text == last.text.rsplit("\n", 1)[-1] else f"{last.text}\n{text}"
                out[-1] = replace(
                    last,
                    end=msg.created_at,
                    text=joined,
                    message_ids=(*last.message_ids, msg.id),
                    reactions=last.reactions + reactions,
                )
                continue
            out.append(
                Turn(
                    author_id=msg.author_id,
                    author_name=msg.author_name,
                    channel_id=channel_id,
                    channel_name=msg.channel_name,
                    start=msg.created_at,
                    end=msg.created_at,
                    text=text,
                    message_ids=(msg.id,),
                    reactions=reactions,
                    reply_to=msg.reply_to,
                )
            )
        turns[channel_id] = out
    return turns


def _id_order(message_id: str) -> tuple[int, str]:
    # Discord snowflakes sort by time as integers; ties of equal timestamps keep their posting order.
    return (int(message_id), "") if message_id.isdigit() else (0, message_id)


def build_examples(
    turns: Mapping[str, Sequence[Turn]],
    member_id: str,
    member_name: str,
    settings: DatasetSettings,
    chat_format: ChatFormat,
    cleaner: Cleaner,
    *,
    names: Mapping[str, str] | None = None,
    multi: bool = False,
    dropped: Counter[str] | None = None,
    style: str = DEFAULT_STYLE,
) -> list[Example]:
    """One example per turn of `member_id`: the preceding turns of its channel (capped by count and time) as context."""
    dropped = Counter() if dropped is None else dropped
    names = names or {}
    examples: list[Example] = []
    seen: set[tuple[str, ...]] = set()
    for channel_id, channel in turns.items():
        position = {mid: k for k, t in enumerate(channel) for mid in t.message_ids}
        for i, turn in enumerate(channel):
            if turn.author_id != member_id:
                continue
            if not cleaner.within_bounds(turn.text):
                dropped["length"] += 1
                continue
            context: list[Turn] = []
            j = i - 1
            while j >= 0 and len(context) < settings.context_messages:
                if turn.start - channel[j].end > settings.context_window_s:
                    break
                context.append(channel[j])
                j -= 1
            context.reverse()
            k = position.get(turn.reply_to or "", i)
            if k <= j and settings.context_messages > 0:
                # A Discord reply to an older message: what it answers matters more than the oldest context turn.
                context = [channel[k], *context[len(context) - settings.context_messages + 1 :]]
            others = [t for t in context if t.author_id != member_id]
            last_other = others[-1].text if others else ""
            key = _duplicate_key(turn.text, last_other)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            utterances = [
                Utterance(t.author_id, names.get(t.author_id, t.author_name), cleaner.clip(t.text))
                for t in context
            ]
            messages = build_messages(
                member_id, member_name, turn.channel_name, utterances, multi=multi, style=style
            )
            examples.append(
                Example(
                    member_id=member_id,
                    channel_id=channel_id,
                    messages=tuple(messages),
                    target=turn.text,
                    prompt=chat_format.prompt(messages),
                    completion=chat_format.completion(messages, turn.text),
                    members=tuple(sorted({member_id, *(t.author_id for t in context)})),
                    ts=turn.start,
                    reactions=turn.reactions,
                    context_key=turn.reply_to or (others[-1].message_ids[0] if others else ""),
                    last_context=last_other,
                )
            )
    examples.sort(key=lambda ex: ex.ts)
    return examples


def _duplicate_key(target: str, last_other: str) -> tuple[str, ...]:
    norm = normalize(target) or target  # emoji-only replies normalise to nothing; compare them verbatim
    return (norm,) if len(norm) >= _COPYPASTE_CHARS else (norm, normalize(last_other))


def split_by_time(
    examples: Sequence[Example], heldout_fraction: float, validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Per member: the latest `heldout_fraction` is held out; a seeded random `validation_fraction` of the rest."""
    train: list[Example] = []
    val: list[Example] = []
    heldout: list[Example] = []
    by_member: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_member[ex.member_id].append(ex)
    for member_id in sorted(by_member):
        own = sorted(by_member[member_id], key=lambda ex: ex.ts)
        n_held = _portion(len(own), heldout_fraction)
        cut = len(own) - n_held
        heldout.extend(own[cut:])
        rest = own[:cut]
        rng = random.Random(f"{seed}:{member_id}")
        val_idx = set(rng.sample(range(len(rest)), _portion(len(rest), validation_fraction)))
        val.extend(ex for k, ex in enumerate(rest) if k in val_idx)
        train.extend(ex for k, ex in enumerate(rest) if k not in val_idx)
    random.Random(seed).shuffle(train)
    return train, val, heldout


def with_shots(
    examples: Sequence[Example], pool: Sequence[Example], k: int, chat_format: ChatFormat, seed: int
) -> list[Example]:
    """Train the way the hybrid persona is served: each prompt also shows `k` other replies of the same member as
    their own earlier turns, in the engine's retrieval shape (`with_examples`).

    The shots come from `pool` (the training split: a held-out reply is never shown), never the example's own
    reply. The engine retrieves the most similar past messages; a seeded random pick is used here, so the adapter
    learns to write like the shown turns rather than to copy a near-duplicate of the answer.
    """
    if k <= 0:
        return list(examples)
    by_member: dict[str, list[str]] = defaultdict(list)
    for ex in pool:
        by_member[ex.member_id].append(ex.target)
    rng = random.Random(f"{seed}:shots")
    out = []
    for ex in examples:
        own = by_member.get(ex.member_id, [])
        picks: list[str] = []
        for _ in range(min(len(own), 4 * k)):
            candidate = own[rng.randrange(len(own))]
            if candidate != ex.target and candidate not in picks:
                picks.append(candidate)
                if len(picks) == k:
                    break
        messages = with_examples(ex.messages, picks)
        out.append(
            replace(
                ex,
                messages=tuple(messages),
                prompt=chat_format.prompt(messages),
                completion=chat_format.completion(messages, ex.target),
            )
        )
    return out


def _portion(n: int, fraction: float) -> int:
    # At least one example whenever the fraction is positive and two or more remain, so every split can be measured.
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def cap_share(examples: Sequence[Example], cap: float, seed: int) -> list[Example]:
    """Downsample the most prolific members so none exceeds `cap` of the result (or 1/members when that is larger)."""
    by_member: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_member[ex.member_id].append(ex)
    if not by_member:
        return []
    cap = max(cap, 1.0 / len(by_member))
    counts = [len(v) for v in by_member.values()]

    def fits(limit: int) -> bool:
        return limit <= cap * sum(min(c, limit) for c in counts) + 1e-9

    lo, hi = 1, max(counts)  # the largest per-member limit that keeps every share under the cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    kept: list[Example] = []
    for member_id in sorted(by_member):
        own = by_member[member_id]
        if len(own) > lo:
            own = random.Random(f"{seed}:cap:{member_id}").sample(own, lo)
        kept.extend(own)
    random.Random(seed).shuffle(kept)
    return kept


def weight_by_reactions(examples: Sequence[Example], low: float = 1.0, high: float = 1.5) -> list[Example]:
    """Scale each example's weight from `low` (no reactions) to `high` (the member's most reacted), log-scaled."""
    top: dict[str, int] = defaultdict(int)
    for ex in examples:
        top[ex.member_id] = max(top[ex.member_id], ex.reactions)
    out = []
    for ex in examples:
        peak = top[ex.member_id]
        share = math.log1p(ex.reactions) / math.log1p(peak) if peak else 0.0
        out.append(replace(ex, weight=round(low + (high - low) * share, 4)))
    return out


def attribution_rows(
    turns: Mapping[str, Sequence[Turn]],
    cleaner: Cleaner,
    exclude: set[tuple[str, float]],
    seed: int,
    member_id: str | None = None,
    *,
    others: int = PANEL_OTHERS,
    per_author: int = PANEL_PER_AUTHOR,
) -> list[dict[str, Any]]:
    """Real turns of the attribution panel (the member + the most active others), minus held-out replies, capped.

    Only the panel's rows reach the job folder: the rest of the community's words never leave the database. For one
    member, `turns` are the member's conversations (`materialize` reads only those), so the others are the people
    the member talks with most.
    """
    by_author: dict[str, list[Turn]] = defaultdict(list)
    for channel in turns.values():
        for t in channel:
            if cleaner.within_bounds(t.text) and (t.author_id, t.start) not in exclude:
                by_author[t.author_id].append(t)
    panel = choose_panel({a: len(v) for a, v in by_author.items()}, member_id, others)
    rows: list[dict[str, Any]] = []
    for author_id in panel:
        own = by_author[author_id]
        if len(own) > per_author:
            own = random.Random(f"{seed}:attr:{author_id}").sample(own, per_author)
        rows.extend({"author_id": author_id, "text": t.text, "ts": t.start} for t in own)
    return rows


def build_dataset(
    messages: Sequence[Message],
    member_id: str,
    settings: Settings,
    chat_format: ChatFormat,
    *,
    names: Mapping[str, str] | None = None,
    mode: str = "sft",
    multi: bool = False,
    allowed: set[str] | None = None,
    feedback: Iterable[Mapping[str, Any]] = (),
    reaction_weighting: bool = False,
    shots: int = 0,
    style: str = DEFAULT_STYLE,
) -> Dataset:
    """All of a job's data from (stored, consenting) messages; `multi` builds every author's examples.

    `shots`: train and validation prompts also show that many of the member's other training replies (`with_shots`);
    held-out prompts stay plain, so perplexity is comparable across jobs.
    """
    if mode not in MODES:  # declared once, in TrainConfig's `mode` field
        raise DatasetError(f"unknown training mode {mode!r} (choose from {', '.join(MODES)})")
    ds = settings.dataset
    names = dict(names or {})
    for msg in messages:
        names.setdefault(msg.author_id, msg.author_name)
    cleaner = Cleaner(names, ds.min_chars, ds.max_chars)
    dropped: Counter[str] = Counter()
    turns = build_turns(messages, cleaner, ds.merge_gap_s, allowed=allowed, dropped=dropped)
    authors = sorted({t.author_id for channel in turns.values() for t in channel}) if multi else [member_id]
    examples: list[Example] = []
    for author in authors:
        examples += build_examples(
            turns,
            author,
            names.get(author, author),
            ds,
            chat_format,
            cleaner,
            names=names,
            multi=multi,
            dropped=dropped,
            style=style,
        )
    if reaction_weighting:
        examples = weight_by_reactions(examples)
    train, val, heldout = split_by_time(examples, ds.heldout_fraction, ds.validation_fraction, ds.seed)
    if multi:
        train = cap_share(train, ds.multi_persona_cap, ds.seed)
    if shots > 0:
        pool = list(train)
        train = with_shots(train, pool, shots, chat_format, ds.seed)
        val = with_shots(val, pool, shots, chat_format, ds.seed + 1)
    need = settings.training.min_examples
    if len(train) + len(val) + len(heldout) < need or not train:
        who = "the consenting members have" if multi else f"member {member_id} has"
        raise NotEnoughExamplesError(
            f"{who} {len(examples)} usable replies; at least {need} are needed to train a persona"
        )
    preference = preference_rows(train, feedback) if mode != "sft" else []
    exclude = {(ex.member_id, ex.ts) for ex in heldout}
    attribution = attribution_rows(turns, cleaner, exclude, ds.seed, None if multi else member_id)
    return Dataset(member_id, multi, mode, train, val, heldout, preference, attribution, dict(dropped))


def write_dataset(
    dataset: Dataset, job_dir: Path, settings: DatasetSettings, key: bytes | None = None
) -> dict[str, Any]:
    """Write JOB_DIR/dataset/ (files sealed with `key` when given) into a temporary folder and rename it in; returns meta."""
    job_dir.mkdir(parents=True, exist_ok=True)
    final = job_dir / "dataset"
    tmp = Path(tempfile.mkdtemp(prefix=".dataset-", dir=job_dir))
    try:
        for name, rows in (
            ("train", [ex.row() for ex in dataset.train]),
            ("val", [ex.row() for ex in dataset.val]),
            ("heldout", [ex.row() for ex in dataset.heldout]),
            ("preference", dataset.preference),
            ("attribution", dataset.attribution),
        ):
            _write_jsonl(tmp / f"{name}.jsonl", rows, key)
        meta = dataset.meta(settings)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        old = None
        if final.exists():
            old = job_dir / f".dataset-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]], key: bytes | None = None) -> None:
    from jobspec.jobdata import seal_bytes

    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    with path.open("wb") as fh:
        fh.write(seal_bytes(key, data, path.name) if key is not None else data)
        fh.flush()
        os.fsync(fh.fileno())


async def _member_window_messages(store: Any, ds: DatasetSettings, member_id: str) -> list[Message]:
    """The member's messages and what precedes them within the context window, plus the messages they reply to.

    Only these can appear in the member's examples (context is capped by `context_window_s`), so a server of
    200,000 messages costs what the member's own conversations cost, not the whole channels. The slack of a few
    merge gaps keeps a context turn whole when its author's double posts straddle the window's edge.
    """
    spans = await store.messages.member_windows(member_id, ds.context_window_s + 4 * ds.merge_gap_s)
    messages: list[Message] = [m async for m in store.messages.iter_windows(spans)]
    have = {m.id for m in messages}
    wanted = {
        m.reply_to for m in messages if m.author_id == member_id and m.reply_to and m.reply_to not in have
    }
    if wanted:
        # A Discord reply to an older message: what it answers is context, even from outside the window.
        messages += [m for m in await store.messages.get_many(sorted(wanted)) if m.channel_id in spans]
    return messages


async def materialize(
    store: Any,
    settings: Settings,
    member_id: str,
    job_dir: Path,
    chat_format: ChatFormat,
    mode: str = "sft",
    multi: bool = False,
    *,
    reaction_weighting: bool = False,
    shots: int = 0,
    style: str = DEFAULT_STYLE,
    encrypt: bool = True,
) -> dict[str, Any]:
    """Read the member's channels from the store, build the dataset off the event loop, write it atomically.

    The files are sealed with the job's key (`data.crypto.job_key_for`), which the executor hands the child.
    """
    # Consent is checked here too: a revoked member's messages may still await erasure and must not train anything.
    allowed = await store.with_scope("train")
    if not multi:
        member = await store.members.get(member_id)
        if member is None:
            raise DatasetError(f"member {member_id} is not known to the store")
        if member_id not in allowed:
            raise DatasetError(f"member {member_id} has not consented to training")
        messages = await _member_window_messages(store, settings.dataset, member_id)
    else:
        # The multi-persona adapter trains on every consenting member: its input is the community by definition.
        channels: set[str] = set()
        for author in sorted(allowed):
            channels.update(await store.messages.channels_of(author))
        messages = [m async for m in store.messages.iter_channels(sorted(channels))]
    names = {m.author_id: m.author_name for m in messages}
    for author_id in sorted(set(names) & allowed):
        known = await store.members.get(author_id)
        if known is not None:
            names[author_id] = known.display_name or known.name
    feedback: list[dict[str, Any]] = []
    if mode != "sft":
        for persona in sorted(allowed) if multi else [member_id]:
            items = await store.feedback.for_persona(persona)
            feedback += feedback_rows(
                items, persona, names.get(persona, persona), chat_format, multi=multi, style=style
            )
    dataset = await asyncio.to_thread(
        build_dataset,
        messages,
        member_id,
        settings,
        chat_format,
        names=names,
        mode=mode,
        multi=multi,
        allowed=allowed,
        feedback=feedback,
        reaction_weighting=reaction_weighting,
        shots=shots,
        style=style,
    )
    from data.crypto import job_key_for

    key = job_key_for(settings, Path(job_dir)) if encrypt else None
    return await asyncio.to_thread(write_dataset, dataset, Path(job_dir), settings.dataset, key)
