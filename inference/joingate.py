"""The join gate: after a human message, would one of these members speak now? Pure, cheap, and one at most.

The question is the product's: would the member answer this message if they were here? The score is the member's
answer rate when present (fitted only on moments where they had written in the channel in the last half hour),
and it is asked only while they are away (the talk-over rule below). A member who is away never answers, so a gate
fitted on "did they write" learns that absent people stay silent; one fitted on present moments learns what
makes people answer: being addressed or replied to, named, asked a question on their own subjects.

Signals, cheapest first: directed at the member ("name: ...", "name, ...", a reply to them), named in passing (a
word match; a name many messages use as a word only counts when addressed), the author answering the member,
a question, their activity here and at this hour (their own timestamps), then the topic against their own words.
The rules come before any score: a persona never talks over its member, never answers a persona (no chains),
never speaks for a member who was pinged (their person was called), and keeps within its budgets.
"""

from __future__ import annotations

import math
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

FEATURES = (
    "expected",  # log of the member's expected messages in the window (their rate here x their hour of the day)
    "directed",  # addressed by name ("name: ..."/"name, ...") or a reply to the member's message
    "named",  # named in passing (a word match, no mention), not directed
    "answering",  # the member's latest message here addressed the author: the author is answering them
    "question",  # the message asks something
    "topic",  # overlap with the member's own words
    "question_topic",  # a question on the member's own subjects: what they usually answer
)
# Log-odds weights of FEATURES: a logistic regression fitted by `python -m doppel.benchjoin fit` on the present
# moments (the member wrote in the channel in the last RECENT_S, not in the quiet minutes) of the benchmark's fit
# windows, never the validation or held-out ones. The truth there: they answered within WINDOW_S (to the author,
# or at all when the message addressed or named them). Present members answer 1.05% of messages.
W_BIAS = -4.82
WEIGHTS = (
    0.086,  # expected: a chattier member answers a little more often
    3.63,  # directed: addressed or replied to, about 40 times the odds
    2.52,  # named in passing, about 12 times
    0.40,  # answering: the author answers what the member last said to them
    0.40,  # question
    0.92,  # topic
    -0.10,  # question on their topic (beside the two above)
)
RECENT_S = 1800.0  # "present": the member wrote in the channel within this long
ACTIVITY_TAU_S = 900.0
WINDOW_S = 180.0
# A name is a common word when at least this share of the candidates' messages use it (and at least this many):
# "ubuntu" in #ubuntu is 4% of messages, a member's nick named in passing at most 0.3%.
COMMON_NAME_SHARE = 0.01
COMMON_NAME_MIN = 20


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


@dataclass(frozen=True)
class Corpus:
    """The candidates' words: occurrences of each in their messages, and how many messages there are."""

    counts: Mapping[str, int]
    messages: int

    def idf(self, word: str) -> float:
        """How rare a word is in these messages; smoothed (+1), so a lone member's favourite word still counts."""
        n = min(self.counts.get(word, 0), self.messages)
        return math.log((1 + self.messages) / (1 + n)) + 1.0

    def common(self, word: str) -> bool:
        """Whether many messages use `word` as a word (so a name spelled like it says little)."""
        n = self.counts.get(word, 0)
        return n >= COMMON_NAME_MIN and n >= COMMON_NAME_SHARE * self.messages


def word_corpus(habits: Iterable[Habits]) -> Corpus:
    """The corpus of the candidates' own messages: by message, so it works for any number of members."""
    counts: dict[str, int] = {}
    messages = 0
    for h in habits:
        messages += h.n_messages
        for w, c in h.word_counts.items():
            counts[w] = counts.get(w, 0) + c
    return Corpus(counts, messages)


def topic_overlap(habits: Habits, text: str, corpus: Corpus) -> float:
    """How much the message's words are the member's own words: idf-weighted share, about 0..1 (names left out)."""
    found = set(words(text)) - set(habits.names)
    if not found or not habits.n_words:
        return 0.0
    score, norm = 0.0, 0.0
    for w in found:
        idf = corpus.idf(w)
        norm += idf
        c = habits.word_counts.get(w, 0)
        if c:
            score += idf * min(1.0, c / 3.0)  # a word used three times is theirs; more is not more
    return score / norm if norm else 0.0


def is_named(habits: Habits, text: str, corpus: Corpus) -> bool:
    """Named without a mention; a name many messages use as a word ("ubuntu") counts only as "name: ..."."""
    if habits.addressed_by(text):
        return True
    return not any(corpus.common(n) for n in habits.names) and habits.named_in(text)


def is_question(text: str) -> bool:
    """Whether the message asks something (a question mark; chat rarely asks without one)."""
    return "?" in text


def features(habits: Habits, moment: Moment, memory: ChannelMemory, corpus: Corpus) -> tuple[float, ...]:
    """The signals, in the order of FEATURES; none says whether the member is here (the gate asks as if they were)."""
    directed = habits.addressed_by(moment.text) or moment.reply_to_author == habits.member_id
    named = not directed and is_named(habits, moment.text, corpus)
    rate = habits.channel_rates.get(moment.channel_id) or (
        max(habits.channel_rates.values()) * 0.25 if habits.channel_rates else 0.1
    )
    expected = max(1e-4, rate * habits.hour_weight(moment.at) * WINDOW_S / 3600.0)
    answering = memory.addressed.get(habits.member_id) == moment.author_id
    question = is_question(moment.text)
    topic = topic_overlap(habits, moment.text, corpus)
    return (
        math.log(expected),
        float(directed),
        float(named),
        float(answering),
        float(question),
        topic,
        topic * float(question),
    )


def probability(habits: Habits, moment: Moment, memory: ChannelMemory, corpus: Corpus) -> tuple[float, bool]:
    """The member's chance of answering within WINDOW_S seconds were they here, and whether they were named."""
    signals = features(habits, moment, memory, corpus)
    z = W_BIAS + sum(w * x for w, x in zip(WEIGHTS, signals, strict=True))
    return 1.0 / (1.0 + math.exp(-z)), bool(signals[1] or signals[2])


def eligible(member_id: str, moment: Moment, memory: ChannelMemory, quiet_s: float) -> bool:
    """The rules before any score: not the author, not pinged, and not while the member is here themself."""
    if member_id == moment.author_id or member_id in moment.pinged:
        return False
    seen = memory.seen.get(member_id)
    return seen is None or moment.at - seen > quiet_s


def best(
    members: Iterable[Habits], moment: Moment, memory: ChannelMemory, level: str, corpus: Corpus
) -> Candidate | None:
    """The likeliest of `members` at or above the level's threshold (the rules were applied by the caller)."""
    threshold = LEVELS[level].threshold
    found: Candidate | None = None
    for h in members:
        p, named = probability(h, moment, memory, corpus)
        if p >= threshold and (found is None or p > found.p):
            found = Candidate(h.member_id, p, named)
    return found


def choose(
    members: Iterable[Habits],
    moment: Moment,
    memory: ChannelMemory,
    level: str,
    *,
    quiet_s: float,
    corpus: Corpus,
    allowed: Iterable[str] | None = None,
) -> Candidate | None:
    """The one member (if any) whose persona should speak after `moment`: the likeliest above the level's threshold."""
    permitted = None if allowed is None else set(allowed)
    pool = [
        h
        for h in members
        if (permitted is None or h.member_id in permitted) and eligible(h.member_id, moment, memory, quiet_s)
    ]
    return best(pool, moment, memory, level, corpus)


async def decide(
    members: Sequence[Habits],
    moment: Moment,
    memory: ChannelMemory,
    level: str,
    *,
    quiet_s: float,
    corpus: Corpus,
    allowed: Iterable[str] | None = None,
) -> Candidate | None:
    """`choose` in a worker thread: scoring a busy server's members never holds up the event loop."""
    import asyncio

    kept = None if allowed is None else frozenset(allowed)
    return await asyncio.to_thread(
        choose, list(members), moment, memory, level, quiet_s=quiet_s, corpus=corpus, allowed=kept
    )
