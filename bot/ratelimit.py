"""Cooldowns per key (member, channel) for persona replies; the clock is injectable so tests need no sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable

from bot.errors import RateLimited


class Cooldown:
    """At most one use per `interval_s` for each key; remembers only the last use per key."""

    def __init__(self, interval_s: float, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.what = what
        self._clock = clock
        self._last: dict[str, float] = {}

    def remaining(self, key: str) -> float:
        """Seconds until `key` may be used again (0 when free)."""
        last = self._last.get(key)
        if last is None:
            return 0.0
        return max(0.0, self.interval_s - (self._clock() - last))

    def check(self, key: str) -> None:
        """Raise `RateLimited` if `key` is still cooling down."""
        wait = self.remaining(key)
        if wait > 0:
            raise RateLimited(f"slow down: {self.what} can talk to a persona again in {wait:.0f} s")

    def hit(self, key: str) -> None:
        """Record a use of `key` now."""
        now = self._clock()
        self._last[key] = now
        if len(self._last) > 4096:  # old keys are all free again: drop them so the map stays small
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval_s}


class EditThrottle:
    """Paces edits of one Discord message: whether enough time has passed to edit it again (a streamed reply)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        """True (and resets the timer) when an edit may go out now."""
        now = self._clock()
        if self._last is None or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False
