"""The request queue: bounded, round robin across guilds, same-persona requests grouped, cancellable."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from core.chatformat import Utterance
from inference.adapters import AdapterKey
from inference.errors import BusyError, EngineClosedError
from inference.requests import GenParams, PersonaRequest

if TYPE_CHECKING:
    from inference.bases import BaseRef

# How far into a guild's queue a worker looks for a request of the persona it already has loaded, and how often
# one request may be passed over that way: grouping saves swaps, the bound keeps it from starving anyone.
GROUP_WINDOW = 8
MAX_SKIPS = 4

_ids = itertools.count(1)


class QueuedReply:
    """One queued reply: its request, the channel back to the caller's event loop, and a cancel flag."""

    def __init__(
        self,
        persona: PersonaRequest,
        context: Sequence[Utterance],
        params: GenParams,
        examples: Sequence[str],
        key: AdapterKey,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = next(_ids)
        self.persona = persona
        self.context = tuple(context)
        self.params = params
        self.examples = tuple(examples)
        self.key = key
        self.guild = persona.guild_id or ""
        self.loop = loop
        self.out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.skips = 0
        self.stats: Any = None
        self.base: BaseRef | None = None  # the base its adapters were trained on (None: the engine's default)

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def send(self, kind: str, value: Any = None) -> None:
        """Hand an item to the caller's loop from a worker thread; a closed loop means the caller is gone."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:
            self.cancel_event.set()


class Scheduler:
    """Thread-safe queue shared by the event loop (submit, discard) and the worker threads (take)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._cond = threading.Condition()
        self._guilds: OrderedDict[str, deque[QueuedReply]] = OrderedDict()
        self._count = 0
        self._closed = False

    def submit(self, job: QueuedReply) -> None:
        """Queue `job`, or raise BusyError when the queue is full (the caller hears it; nothing is dropped)."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the persona engine is shutting down")
            if self._count >= self.capacity:
                raise BusyError(
                    f"too many replies in progress ({self._count} waiting); try again in a moment"
                )
            self._guilds.setdefault(job.guild, deque()).append(job)
            self._count += 1
            self._cond.notify()

    def discard(self, job: QueuedReply) -> bool:
        """Remove a job whose caller went away; False when a worker already took it."""
        with self._cond:
            q = self._guilds.get(job.guild)
            if q is None or job not in q:
                return False
            q.remove(job)
            self._count -= 1
            if not q:
                del self._guilds[job.guild]
            return True

    def take(self, current: AdapterKey, timeout: float | None = None) -> QueuedReply | None:
        """Next job for a worker whose context holds adapter set `current`; None once closed and empty."""
        with self._cond:
            while not self._count:
                if self._closed:
                    return None
                if not self._cond.wait(timeout):
                    return None
            # Round robin: the guild served longest ago goes first, then moves to the back.
            guild, q = next(iter(self._guilds.items()))
            job = self._pick(q, current)
            self._count -= 1
            if q:
                self._guilds.move_to_end(guild)
            else:
                del self._guilds[guild]
            return job

    @staticmethod
    def _pick(q: deque[QueuedReply], current: AdapterKey) -> QueuedReply:
        head = q[0]
        if head.key != current and head.skips < MAX_SKIPS:
            for job in itertools.islice(q, 1, GROUP_WINDOW):
                if job.key == current:
                    for passed in itertools.islice(q, 0, q.index(job)):
                        passed.skips += 1
                    q.remove(job)
                    return job
        q.popleft()
        return head

    def pending(self) -> int:
        with self._cond:
            return self._count

    def close(self) -> list[QueuedReply]:
        """Stop accepting; wake the workers; return what was still queued (the caller fails those jobs)."""
        with self._cond:
            self._closed = True
            left = [job for q in self._guilds.values() for job in q]
            self._guilds.clear()
            self._count = 0
            self._cond.notify_all()
            return left
