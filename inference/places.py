"""A serving place: one process that serves personas, registered in the store, acting on every erasure.

`forget` may run in another process (a shell's `doppel forget` while the bot serves). It writes a notice to the
store and waits; each place reads notices it has not seen (every half second, and before each reply), lets go of
the member's adapters and cached words, and answers whether it held anything and whether it let go of all of it.
What erasure decides is read from durable state when the place acts, never from what the place remembers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from data.serving import Notice
    from data.store import Store

log = logging.getLogger(__name__)

# A place that has not beaten for this long is taken as gone (a killed process): forget does not wait for it.
LIVE_S = 6.0
POLL_S = 0.5
BEAT_S = 2.0


@dataclass(frozen=True)
class LetGo:
    """A place's answer to one erasure."""

    held: bool
    released: bool
    detail: str = ""


class Holder(Protocol):
    """What a serving place must let go of: an engine, a server client, a managed server."""

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo: ...


def doomed_paths(adapters_dir: Path, notice: Notice) -> Callable[[str], bool]:
    """True for a file under one of the notice's adapter folders or under the member's own adapters folder."""
    roots = [Path(p).resolve() for p in notice.adapters]
    roots.append((adapters_dir / notice.member_id).resolve())

    def doomed(path: str) -> bool:
        resolved = Path(path).resolve()
        return any(resolved == root or resolved.is_relative_to(root) for root in roots)

    return doomed


class ServingPlace:
    """Registers a process that serves, beats while it lives, and hands each erasure to its holder."""

    def __init__(self, store: Store, kind: str, label: str, holder: Holder) -> None:
        self.store = store
        self.kind = kind
        self.label = label
        self.holder = holder
        self.id = f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seen = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Register and start watching (erasures posted before the start concern nothing this process holds)."""
        self._seen = await self.store.serving.register(self.id, self.kind, self.label, os.getpid())
        self._task = asyncio.get_running_loop().create_task(self._watch(), name=f"serving-place {self.id}")

    async def close(self) -> None:
        """Stop watching and unregister (a stopped process holds nothing)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.store.serving.unregister(self.id)

    async def sync(self) -> int:
        """Act on every erasure not yet seen; returns how many. Called before each reply and by the watcher."""
        async with self._lock:
            notices = await self.store.serving.after(self._seen)
            for notice in notices:
                doomed = doomed_paths(self.store.settings.adapters_dir, notice)
                try:
                    answer = await self.holder.let_go(notice.member_id, doomed)
                except Exception as exc:
                    log.exception("serving place %s could not act on an erasure", self.id)
                    answer = LetGo(True, False, f"{type(exc).__name__}: {exc}")
                await self.store.serving.ack(
                    notice.seq, self.id, held=answer.held, released=answer.released, detail=answer.detail
                )
                self._seen = notice.seq
            return len(notices)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        beat_at = loop.time() + BEAT_S
        while True:
            try:
                await self.sync()
                if loop.time() >= beat_at:
                    await self.store.serving.beat(self.id)
                    beat_at = loop.time() + BEAT_S
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serving place %s: watching erasures failed; retrying", self.id)
            await asyncio.sleep(POLL_S)


def describe(places: Sequence[tuple[str, LetGo | None]]) -> list[dict[str, object]]:
    """Forget's report of each place: what it is, whether it answered, held and let go."""
    out: list[dict[str, object]] = []
    for label, answer in places:
        if answer is None:
            out.append({"place": label, "answered": False})
        else:
            out.append(
                {
                    "place": label,
                    "answered": True,
                    "held": answer.held,
                    "released": answer.released,
                    "detail": answer.detail,
                }
            )
    return out


def place_words(place: Mapping[str, object]) -> str:
    """What one serving place said (an entry of `describe`), in words a person acts on."""
    if not place["answered"] and place.get("down"):
        return (
            f"not running (last seen {_ago(place.get('last_seen_s'))}): it held nothing, and it will not load the "
            "erased adapters when it starts again"
        )
    if not place["answered"]:
        return "DID NOT ANSWER: it may still hold the member's adapter; restart it"
    if not place["released"]:
        return f"STILL HOLDS the member's adapter: {place.get('detail') or 'restart it'}"
    return "let go of the member's adapter" if place["held"] else "held nothing of the member"


def _ago(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "some time ago"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
