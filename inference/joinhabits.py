"""A member's conversational habits from their own messages: words, hours, channels, reply delays, typing, bursts.

Pure and synchronous (no store, no Discord): the bot builds habits from stored messages in a worker thread, the
join benchmark from IRC logs. Timestamps are UTC epoch seconds.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# A member's message counts as a reply when it follows someone else's message within this long.
REPLY_WINDOW_S = 600.0
# Messages of one member with nobody in between, this close together, are one turn (a burst).
BURST_GAP_S = 60.0
DEFAULT_CPS = 5.0  # typing speed (characters per second) when the member's own cannot be measured
_WORD = re.compile(r"[a-z0-9][a-z0-9'_-]{2,}")
STOPWORDS = frozenset(
    "the and for you are but not this that with have has was were what when where which who why how can could "
    "would should will just like get got its it's i'm don't does did any all one out about there their they them "
    "then than your yours from into only also some more very really yes yeah okay well here now been being".split()
)


def words(text: str) -> list[str]:
    """Content words of a message (lower case, three letters or more, common words dropped)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class OwnMessage:
    """One of the member's messages, with when someone else last spoke before it in the same channel."""

    channel_id: str
    created_at: float
    text: str
    prev_other_at: float | None = None


@dataclass(frozen=True)
class Habits:
    """What the gate and the timing need to know about one member, built once from their messages."""

    member_id: str
    names: tuple[str, ...]
    word_counts: dict[str, int] = field(default_factory=dict)
    n_words: int = 0
    hours: tuple[float, ...] = (1 / 24,) * 24
    channel_rates: dict[str, float] = field(default_factory=dict)  # messages per active hour, per channel
    n_messages: int = 0
    delays: tuple[float, ...] = ()
    bursts: tuple[int, ...] = ()
    cps: float = DEFAULT_CPS
    last_at: float | None = None
    median_chars: int = 40
    name_pattern: re.Pattern[str] | None = None

    def hour_weight(self, at: float) -> float:
        """How much more (>1) or less (<1) than on average the member writes at this hour of the day (UTC)."""
        return 24.0 * self.hours[int(at // 3600) % 24]

    def named_in(self, text: str) -> bool:
        """Whether `text` names the member (any of their names as a whole word; no mention needed)."""
        return bool(self.name_pattern and self.name_pattern.search(text))

    def addressed_by(self, text: str) -> bool:
        """Whether `text` opens by addressing the member ("name: ..." / "name, ...")."""
        head = text.lstrip().lower()
        return any(head.startswith(n) and head[len(n) : len(n) + 1] in (":", ",") for n in self.names)


def name_forms(*names: str) -> tuple[str, ...]:
    """The lower-case forms a member may be called by: each name, and a display name's first word."""
    forms: set[str] = set()
    for name in names:
        name = name.strip().lower()
        if len(name) >= 3:
            forms.add(name)
        first = name.split(" ")[0] if " " in name else ""
        if len(first) >= 3:
            forms.add(first)
    return tuple(sorted(forms, key=lambda n: (-len(n), n)))


def build_habits(member_id: str, names: Sequence[str], own: Sequence[OwnMessage]) -> Habits:
    """Habits from the member's messages (any order)."""
    msgs = sorted(own, key=lambda m: (m.channel_id, m.created_at))
    counts: Counter[str] = Counter()
    hours = [1.0] * 24  # add-one smoothing: a member never seen at 3 am is unlikely there, not forbidden
    per_channel: Counter[str] = Counter()
    active_hours: dict[str, set[int]] = {}
    delays: list[float] = []
    bursts: list[int] = []
    speeds: list[float] = []
    run, prev = 0, None
    for m in msgs:
        counts.update(words(m.text))
        hours[int(m.created_at // 3600) % 24] += 1
        per_channel[m.channel_id] += 1
        active_hours.setdefault(m.channel_id, set()).add(int(m.created_at // 3600))
        continues = (
            prev is not None
            and prev.channel_id == m.channel_id
            and 0 <= m.created_at - prev.created_at <= BURST_GAP_S
            and (m.prev_other_at is None or m.prev_other_at <= prev.created_at)
        )
        if continues and prev is not None:
            run += 1
            gap = m.created_at - prev.created_at
            if gap > 0:
                speeds.append(len(m.text) / gap)
        else:
            if run:
                bursts.append(run)
            run = 1
            if m.prev_other_at is not None and 0 <= m.created_at - m.prev_other_at <= REPLY_WINDOW_S:
                delays.append(m.created_at - m.prev_other_at)
        prev = m
    if run:
        bursts.append(run)
    total = sum(hours)
    forms = name_forms(*names)
    pattern = (
        re.compile(r"(?<![\w])(" + "|".join(re.escape(n) for n in forms) + r")(?![\w])", re.IGNORECASE)
        if forms
        else None
    )
    # Typing speed: characters over the gap between two messages of one burst; the median resists pauses.
    cps = min(15.0, max(2.0, statistics.median(speeds))) if len(speeds) >= 5 else DEFAULT_CPS
    return Habits(
        member_id=member_id,
        names=forms,
        word_counts=dict(counts),
        n_words=sum(counts.values()),
        hours=tuple(h / total for h in hours),
        channel_rates={c: n / max(1, len(active_hours[c])) for c, n in per_channel.items()},
        n_messages=len(msgs),
        delays=tuple(sorted(delays)),
        bursts=tuple(bursts),
        cps=cps,
        last_at=max((m.created_at for m in msgs), default=None),
        median_chars=int(statistics.median(len(m.text) for m in msgs)) if msgs else 40,
        name_pattern=pattern,
    )


def sample_delay(habits: Habits, rng: random.Random, cap_s: float = REPLY_WINDOW_S) -> float:
    """A reply delay drawn from the member's own delays (their empirical distribution, interpolated), capped."""
    pool = [d for d in habits.delays if d <= cap_s]
    if not pool:
        return min(cap_s, 10.0 + rng.random() * 20.0)
    # The inverse of the interpolated empirical CDF: the member's own distribution, not copies of logged values.
    x = rng.random() * (len(pool) - 1)
    k = int(x)
    hi = pool[min(k + 1, len(pool) - 1)]
    return min(cap_s, pool[k] + (x - k) * (hi - pool[k]))


def sample_burst(habits: Habits, rng: random.Random, cap: int = 3) -> int:
    """How many messages this turn has, drawn from the member's own messages-per-turn."""
    if not habits.bursts:
        return 1
    return max(1, min(cap, habits.bursts[rng.randrange(len(habits.bursts))]))


def typing_s(habits: Habits, chars: int, cap_s: float) -> float:
    """How long the member would type `chars` characters."""
    return min(cap_s, max(0.0, chars / max(habits.cps, 0.1)))
