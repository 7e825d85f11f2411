"""The real-chat benchmarks' own store: a public corpus imported with consent, a member's split, a retriever that
hides the held-out replies (shared by `doppel bench fidelity`, its `--members` run and `doppel bench memory`)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.chatformat import DEFAULT_STYLE, Utterance
from core.settings import Settings
from data.records import Message
from doppel.benchcorpus import BOTS, author_id, same_text, to_exports
from jobs.dataset import Dataset, Turn

if TYPE_CHECKING:
    from inference.engine import ExampleSource
    from inference.shape import MessageShape


async def prepare(
    settings: Settings, panel: Sequence[str], logs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Import `logs` into the store of `settings`, every author consenting and the panel's members named."""
    from consent.service import ConsentService
    from data.dce_import import import_exports
    from data.records import Member
    from data.store import Store

    authors = sorted({nick for log in logs for _, nick, _ in log["lines"] if nick not in BOTS})
    async with Store.open(settings) as store:
        await ConsentService(store).grant(
            [author_id(n) for n in authors], ["train", "chat"], actor="bench", channel="cli"
        )
        for nick in panel:
            await store.members.upsert(Member(id=author_id(nick), name=nick, display_name=nick))
        with tempfile.TemporaryDirectory(prefix="doppel-fidelity-") as tmp:
            report = await import_exports(store, to_exports(logs, Path(tmp)), source="import")
    return {"authors": len(authors), "stored": report["total"]["stored"], "read": report["total"]["read"]}


@dataclass(frozen=True)
class MemberSplit:
    """A member's channels as stored, the product's dataset of them (its time split) and their cleaned turns."""

    member_id: str
    messages: list[Message]
    dataset: Dataset
    turns: dict[str, list[Turn]]


async def member_split(settings: Settings, member: str, style: str = DEFAULT_STYLE) -> MemberSplit:
    """Read every message of the channels `member` (an IRC nick) speaks in; build their dataset and turns."""
    from core.chatformat import ChatFormat
    from data.store import Store
    from jobs.dataset import build_dataset, build_turns
    from jobspec.cleaning import Cleaner

    fmt = ChatFormat.from_gguf(settings.base_gguf_path())
    mid = author_id(member)
    async with Store.open(settings) as store:
        channels = await store.messages.channels_of(mid)
        messages = [m async for m in store.messages.iter_channels(sorted(channels))]
    names = {m.author_id: m.author_name for m in messages}
    turns = build_turns(
        messages,
        Cleaner(names, settings.dataset.min_chars, settings.dataset.max_chars),
        settings.dataset.merge_gap_s,
    )
    return MemberSplit(mid, messages, build_dataset(messages, mid, settings, fmt, style=style), turns)


class Heldout:
    """A retriever that never hands the persona one of the held-out replies it is scored on."""

    def __init__(self, inner: ExampleSource, banned: set[str]) -> None:
        self.inner = inner
        self.banned = {same_text(b) for b in banned}

    async def examples(self, member_id: str, context: Sequence[Utterance], k: int) -> list[str]:
        got = await self.inner.examples(member_id, context, k + 8)
        return [e for e in got if same_text(e) not in self.banned][:k]

    async def shape(self, member_id: str) -> MessageShape | None:
        return await self.inner.shape(member_id)

    def forget(self, member_id: str) -> bool | None:
        return self.inner.forget(member_id)
