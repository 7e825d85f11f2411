"""The join gate: after a human message, would one of these members speak now? Pure, cheap, and one at most.

Signals, cheapest first: named or addressed (a word match), who spoke last and to whom, how recently the member
was in this channel, their activity here and at this hour (their own timestamps), then the topic against their own
words. The rules come before any score: a persona never talks over its member, never answers a persona (no chains),
never speaks for a member who was pinged (their person was called), and keeps within its budgets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from core.settings import JOIN_LEVELS
from inference.joinhabits import Habits, words


@dataclass(frozen=True)
class Level:
    """One chattiness level: the probability a member must reach, and the hourly budgets."""

    threshold: float
    channel_per_hour: int
    persona_per_hour: int


# Keyed by the level names declared once in the settings (JOIN_LEVELS); quiet speaks only when it is nearly sure.
LEVELS: dict[str, Level] = dict(
    zip(
        JOIN_LEVELS,
        (Level(0.3, 6, 2), Level(0.15, 12, 4), Level(0.06, 24, 8)),
        strict=True,
    )
)

# Log-odds weights of the signals, in the order `features` returns them: a logistic regression fitted on the join
# benchmark's fit windows (never the validation or held-out ones), the rare "talking" signal capped.
W_BIAS = -4.3
WEIGHTS = (
    0.04,  # log of the member's expected messages in the window (their rate here x their hour of the day)
    3.9,  # named (a word match, no mention)
    -2.4,  # addressed ("name: ..."): named already counts; opening with the name adds less than naming in passing
    4.0,  # talking: the author answered the member, or the member had addressed the author
    2.9,  # the member wrote here in the last half hour (but not in the quiet minutes)
    0.15,  # topic overlap with the member's own words
    -0.44,  # per log(1 + days) since the member last wrote anywhere: people who left do not come back at once
    0.76,  # how engaged the member was here lately (their fading message count)
)
RECENT_S = 1800.0
ACTIVITY_TAU_S = 900.0
WINDOW_S = 180.0


class ChannelMemory:
    """What the gate remembers of one channel: who last wrote when, whom they last addressed; no text."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}  # human author -> their latest message here
        self.addressed: dict[
            str, str
        ] = {}  # human author -> the member their latest message named or replied to
        self.activity: dict[str, tuple[float, float]] = {}  # human author -> (decayed message count, at)
        self.last_human = False
        self.humans = 0  # human messages so far: a pending persona turn is stale once this moves on

    def note(self, author_id: str, at: float, *, human: bool, addressed: str | None = None) -> None:
        """Remember one message (a persona's or a webhook's counts as not human)."""
        self.last_human = human
        if not human:
            return
        self.humans += 1
        self.seen[author_id] = at
        level, then = self.activity.get(author_id, (0.0, at))
        self.activity[author_id] = (level * math.exp(-(at - then) / ACTIVITY_TAU_S) + 1.0, at)
        if addressed:
            self.addressed[author_id] = addressed
        else:
            self.addressed.pop(author_id, None)
        if len(self.seen) > 2000:  # bounded: people silent for half an hour are only "not recent" anyway
            for old in [a for a, t in self.seen.items() if at - t > RECENT_S]:
                self.seen.pop(old, None)
                self.addressed.pop(old, None)
                self.activity.pop(old, None)

    def engaged(self, author_id: str, at: float) -> float:
        """How much the author has been writing here lately: their messages, each fading over ACTIVITY_TAU_S."""
        level, then = self.activity.get(author_id, (0.0, at))
        return level * math.exp(-(at - then) / ACTIVITY_TAU_S)


@dataclass(frozen=True)
class Moment:
    """A human message just arrived: what the gate scores against."""

    channel_id: str
    at: float
    author_id: str
    text: str
    reply_to_author: str | None = None
    pinged: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Candidate:
    """A member the gate may let speak, and their probability."""

    member_id: str
    p: float
    named: bool


def topic_overlap(habits: Habits, text: str, df: Mapping[str, int], n_members: int) -> float:
    """How much the message's words are the member's own words: idf-weighted share, about 0..1."""
    found = words(text)
    if not found or not habits.n_words:
        return 0.0
    score, norm = 0.0, 0.0
    for w in set(found):
        idf = math.log((1 + n_members) / (1 + df.get(w, 0)))
        norm += idf
        c = habits.word_counts.get(w, 0)
        if c:
            score += idf * min(1.0, c / 3.0)  # a word used three times is theirs; more is not more
    return score / norm if norm else 0.0


def is_named(habits: Habits, text: str, df: Mapping[str, int], n_members: int) -> bool:
    """Named without a mention; a name that is also a word many members use ("ubuntu") counts only as "name: ..."."""
    if habits.addressed_by(text):
        return True
    common = any(df.get(n, 0) * 5 > n_members for n in habits.names)
    return not common and habits.named_in(text)


def features(
    habits: Habits, moment: Moment, memory: ChannelMemory, df: Mapping[str, int], n_members: int
) -> tuple[float, ...]:
    """The signals, in the order of WEIGHTS: log expected messages, named, addressed, talking, recent, topic, stale, engaged."""
    addressed = habits.addressed_by(moment.text)
    named = is_named(habits, moment.text, df, n_members)
    rate = habits.channel_rates.get(moment.channel_id) or (
        max(habits.channel_rates.values()) * 0.25 if habits.channel_rates else 0.1
    )
    expected = max(1e-4, rate * habits.hour_weight(moment.at) * WINDOW_S / 3600.0)
    talking = (
        moment.reply_to_author == habits.member_id
        or memory.addressed.get(habits.member_id) == moment.author_id
    )
    seen = memory.seen.get(habits.member_id)
    recent = seen is not None and moment.at - seen <= RECENT_S
    engaged = math.log1p(memory.engaged(habits.member_id, moment.at))
    stale = math.log1p(max(0.0, moment.at - habits.last_at) / 86400.0) if habits.last_at is not None else 0.0
    return (
        math.log(expected),
        float(named),
        float(addressed),
        float(talking),
        float(recent),
        topic_overlap(habits, moment.text, df, n_members),
        stale,
        engaged,
    )


def probability(
    habits: Habits, moment: Moment, memory: ChannelMemory, df: Mapping[str, int], n_members: int
) -> tuple[float, bool]:
    """The member's chance of writing within the next WINDOW_S seconds, and whether they were named."""
    signals = features(habits, moment, memory, df, n_members)
    z = W_BIAS + sum(w * x for w, x in zip(WEIGHTS, signals, strict=True))
    return 1.0 / (1.0 + math.exp(-z)), bool(signals[1])


def document_frequency(habits: Iterable[Habits]) -> dict[str, int]:
    """In how many members' words each word occurs (the topic signal's idf)."""
    df: dict[str, int] = {}
    for h in habits:
        for w in h.word_counts:
            df[w] = df.get(w, 0) + 1
    return df


def eligible(member_id: str, moment: Moment, memory: ChannelMemory, quiet_s: float) -> bool:
    """The rules before any score: not the author, not pinged, and not while the member is here themself."""
    if member_id == moment.author_id or member_id in moment.pinged:
        return False
    seen = memory.seen.get(member_id)
    return seen is None or moment.at - seen > quiet_s


def choose(
    members: Iterable[Habits],
    moment: Moment,
    memory: ChannelMemory,
    level: str,
    *,
    quiet_s: float,
    df: Mapping[str, int],
    allowed: Iterable[str] | None = None,
) -> Candidate | None:
    """The one member (if any) whose persona should speak after `moment`: the likeliest above the level's threshold."""
    rule = LEVELS[level]
    pool = list(members)
    permitted = None if allowed is None else set(allowed)
    best: Candidate | None = None
    for h in pool:
        if permitted is not None and h.member_id not in permitted:
            continue
        if not eligible(h.member_id, moment, memory, quiet_s):
            continue
        p, named = probability(h, moment, memory, df, len(pool))
        if p >= rule.threshold and (best is None or p > best.p):
            best = Candidate(h.member_id, p, named)
    return best


class Budget:
    """Unprompted messages per channel and per persona in a sliding hour (in memory: a restart forgets it)."""

    def __init__(self) -> None:
        self._channel: dict[str, deque[float]] = {}
        self._persona: dict[str, deque[float]] = {}

    @staticmethod
    def _count(q: deque[float], now: float) -> int:
        while q and now - q[0] > 3600.0:
            q.popleft()
        return len(q)

    def allowed(self, channel_id: str, level: str, now: float) -> bool:
        """Whether the channel has budget left at its level."""
        return (
            self._count(self._channel.setdefault(channel_id, deque()), now) < LEVELS[level].channel_per_hour
        )

    def persona_allowed(self, member_id: str, level: str, now: float) -> bool:
        """Whether the persona has budget left at this level."""
        return self._count(self._persona.setdefault(member_id, deque()), now) < LEVELS[level].persona_per_hour

    def spend(self, channel_id: str, member_id: str, now: float) -> None:
        """Count one unprompted turn."""
        self._channel.setdefault(channel_id, deque()).append(now)
        self._persona.setdefault(member_id, deque()).append(now)


async def decide(
    members: Sequence[Habits],
    moment: Moment,
    memory: ChannelMemory,
    level: str,
    *,
    quiet_s: float,
    df: Mapping[str, int],
    allowed: Iterable[str] | None = None,
) -> Candidate | None:
    """`choose` in a worker thread: scoring a busy server's members never holds up the event loop."""
    import asyncio

    kept = None if allowed is None else frozenset(allowed)
    return await asyncio.to_thread(
        choose, list(members), moment, memory, level, quiet_s=quiet_s, df=df, allowed=kept
    )
