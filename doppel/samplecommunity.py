"""A generated DiscordChatExporter export of a small community with clearly different writing styles (for the demo)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from doppel import dceformat as dce

TOPICS = [
    "the raid tonight",
    "pizza",
    "the new patch",
    "my cat",
    "rust vs go",
    "the weekend",
    "coffee",
    "that movie",
    "the server event",
    "exams",
    "the playlist",
    "keyboards",
]


def _pixel(rng: random.Random, topic: str) -> str:
    """Lowercase, no punctuation, 'lol', keyboard smashes and emoji."""
    opener = rng.choice(["omg", "lol", "ngl", "wait", "okay so", "bruh", "lmaooo", "fr"])
    body = rng.choice(
        [
            f"{topic} is sooo good",
            f"i cant stop thinking abt {topic}",
            f"who else is hyped for {topic}",
            f"{topic} again?? lol",
            f"ok but {topic} tho",
            f"me and {topic} are in a relationship now",
        ]
    )
    tail = rng.choice(["😭", "💀", "✨", "lol", "asdfghjkl", "🥺👉👈", "fr fr", ""])
    return f"{opener} {body} {tail}".strip()


def _captain(rng: random.Random, topic: str) -> str:
    """Shouty caps, exclamation marks, rallying calls."""
    line = rng.choice(
        [
            f"ALRIGHT CREW, {topic.upper()} IS HAPPENING!!",
            f"NO SURRENDER ON {topic.upper()}!!!",
            f"WHO'S WITH ME FOR {topic.upper()}?!",
            f"HOLD THE LINE, {topic.upper()} WAITS FOR NO ONE!!",
            f"ALL HANDS ON DECK FOR {topic.upper()}!",
            f"THAT'S THE SPIRIT! {topic.upper()} OR BUST!!",
        ]
    )
    return line + rng.choice([" ⚓", " 🏴‍☠️", "", " ONWARDS!"])


def _prof(rng: random.Random, topic: str) -> str:
    """Long formal sentences with semicolons and hedges."""
    return rng.choice(
        [
            f"Indeed; one might argue that {topic} deserves a more careful treatment than we usually give it.",
            f"I would posit, with some hesitation, that {topic} is rather more nuanced than it first appears.",
            f"Consider, for a moment, the history of {topic}; it is, in many respects, instructive.",
            f"With respect, I must disagree; {topic} is not merely a matter of taste, but of principle.",
            f"Furthermore, the evidence regarding {topic} remains, at best, inconclusive.",
        ]
    )


def _mara(rng: random.Random, topic: str) -> str:
    """Soft, tildes, kaomoji, short."""
    return rng.choice(
        [
            f"aww {topic}~ (◕‿◕)",
            f"hehe {topic} makes me happy~",
            f"ooh {topic}!! tell me more~ (´｡• ᵕ •｡`)",
            f"{topic} sounds cozy~",
            f"*hugs* {topic} will be okay~",
            f"yay {topic}~ ♡",
        ]
    )


def _dev(rng: random.Random, topic: str) -> str:
    """Terse engineer: code spans, 'tbh', numbers."""
    return rng.choice(
        [
            f"tbh {topic} is just `O(n^2)` with extra steps",
            f"filed a bug about {topic}: `won't fix`",
            f"{topic}? works on my machine",
            f"benchmarked {topic}: 3.2x slower, 40% more RAM",
            f"have you tried turning {topic} off and on again",
            f"`git blame {topic.replace(' ', '_')}` says it was me",
        ]
    )


@dataclass(frozen=True)
class SampleMember:
    """One generated member with a writing style."""

    id: str
    name: str
    nickname: str
    style: Callable[[random.Random, str], str]


MEMBERS = (
    SampleMember("100000000000000001", "pixelkat", "Pixel", _pixel),
    SampleMember("100000000000000002", "captain_rook", "Captain Rook", _captain),
    SampleMember("100000000000000003", "prof_hale", "Prof. Hale", _prof),
    SampleMember("100000000000000004", "mara.moon", "Mara", _mara),
    SampleMember("100000000000000005", "devon_ops", "Devon", _dev),
)
BOT_ID = "100000000000000099"


def _author(m: SampleMember) -> dict[str, Any]:
    return dce.author(m.id, m.name, m.nickname, avatar_url="https://cdn.discordapp.com/embed/avatars/0.png")


def generate_export(channel_name: str, channel_id: str, n_messages: int, seed: int) -> dict[str, Any]:
    """A DCE JSON export of one channel: conversations among MEMBERS, plus a bot and a join message to skip."""
    rng = random.Random(seed)
    t = datetime(2026, 3, 1, 18, 0, tzinfo=UTC)
    messages: list[dict[str, Any]] = []
    # Snowflake-sized ids, disjoint per channel (a seeded channel index in the high digits).
    next_id = 1_100_000_000_000_000_000 + (int(channel_id) % 100) * 10_000_000
    last_id: str | None = None
    while len(messages) < n_messages:
        topic = rng.choice(TOPICS)
        speakers = rng.sample(MEMBERS, k=rng.randint(2, 4))
        t += timedelta(minutes=rng.randint(40, 300))
        prev: SampleMember | None = None
        for _ in range(rng.randint(4, 10)):
            # People mostly take turns; now and then someone double-posts (the dataset merges those).
            choices = [s for s in speakers if s is not prev] if rng.random() < 0.85 else list(speakers)
            m = prev = rng.choice(choices)
            t += timedelta(seconds=rng.randint(15, 240))
            msg_id = str(next_id)
            next_id += 1
            reply = rng.random() < 0.25 and last_id is not None
            content = m.style(rng, topic)
            reactions = [dce.reaction("😂", "joy", rng.randint(1, 4))] if rng.random() < 0.2 else []
            messages.append(
                dce.message(
                    msg_id,
                    t,
                    content,
                    _author(m),
                    reply_to=(last_id, channel_id, GUILD_ID) if reply and last_id else None,
                    reactions=reactions,
                )
            )
            last_id = msg_id
        if rng.random() < 0.05:
            t += timedelta(seconds=5)
            bot = dce.author(BOT_ID, "EventBot", is_bot=True)
            messages.append(dce.message(str(next_id), t, "Reminder: server event on Friday!", bot))
            next_id += 1
    head = dce.header(
        GUILD_ID,
        "Doppel Demo Server",
        channel_id,
        channel_name,
        "Text Channels",
        datetime(2026, 11, 1, tzinfo=UTC),
    )
    return dce.export(head, messages)


def write_community(folder: Path, n_messages: int = 3000, seed: int = 7) -> list[Path]:
    """Write the sample community's exports (two channels) into `folder`; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(("general", "hangout")):
        export = generate_export(name, f"20000000000000000{i}", n_messages // 2, seed + i)
        path = folder / f"Doppel Demo Server - {name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths


# --- A large community (for `doppel bench scale`): many members, each a base style plus personal quirks -----------
QUIRK_WORDS = (
    "honestly",
    "ngl",
    "lowkey",
    "tbf",
    "imo",
    "welp",
    "yikes",
    "anyway",
    "true",
    "fair",
    "oof",
    "big if",
    "classic",
    "send help",
    "no cap",
    "as one does",
    "brb",
    "meh",
    "wild",
    "iconic",
)
QUIRK_MARKS = (
    "🙃",
    "🔥",
    "🤖",
    "🐸",
    "🌙",
    "🍕",
    "🎲",
    "🧃",
    "🦊",
    "🌵",
    ":)",
    ";D",
    "xD",
    "^^",
    "!!",
    "...",
    "?!",
    "<3",
    "-_-",
    "o7",
)
STYLES = (_pixel, _captain, _prof, _mara, _dev)
GUILD_ID = "100000000000000000"
LARGE_MEMBER_BASE = 300_000_000_000_000_000


@dataclass(frozen=True)
class LargeMember:
    """A generated member of a large community: a base style, a personal tic and a sign-off."""

    id: str
    name: str
    nickname: str
    style: int
    quirk: str
    mark: str

    def say(self, rng: random.Random, topic: str) -> str:
        """One message in this member's voice."""
        text = STYLES[self.style](rng, topic)
        if rng.random() < 0.5:
            text = f"{self.quirk} {text}" if self.style != 1 else f"{self.quirk.upper()} {text}"
        return f"{text} {self.mark}" if rng.random() < 0.7 else text


def large_members(n: int) -> list[LargeMember]:
    """`n` members with distinct (style, quirk, mark) combinations while there are enough (5 x 20 x 20 = 2,000)."""
    out = []
    for i in range(n):
        style, rest = i % len(STYLES), i // len(STYLES)
        quirk = QUIRK_WORDS[rest % len(QUIRK_WORDS)]
        mark = QUIRK_MARKS[(rest // len(QUIRK_WORDS) + rest) % len(QUIRK_MARKS)]
        out.append(
            LargeMember(str(LARGE_MEMBER_BASE + i), f"member{i:05d}", f"Member {i}", style, quirk, mark)
        )
    return out


def write_large_community(
    folder: Path,
    members: int = 1000,
    messages: int = 200_000,
    *,
    channels: int = 8,
    top_messages: int = 5000,
    seed: int = 11,
) -> dict[str, Any]:
    """Write a DCE export per channel of a community of `members` people and about `messages` messages, streamed.

    Member 0 (the persona a benchmark trains, the most active) takes part in enough conversations for about
    `top_messages` messages whatever the community's size; the others are Zipf-distributed (most talk rarely). Returns the
    files, the member ids and the message count per author, written one message at a time (never held whole).
    """
    if members < 5 or messages < 100 or channels < 1:
        raise ValueError("a large community needs at least 5 members, 100 messages and 1 channel")
    import bisect
    import itertools

    rng = random.Random(seed)
    people = large_members(members)
    others = people[1:]
    # Zipf with an offset: a long tail of quiet members, and no one else as active as the persona.
    cum = list(itertools.accumulate(1.0 / (rank + 20) for rank in range(len(others))))
    # Conversations average 7 messages among 3 speakers: the persona joins enough of them to write ~top_messages.
    join = min(1.0, 3.0 * top_messages / messages)
    counts: dict[str, int] = {}
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    per_channel = messages // channels
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for c in range(channels):
        channel_id = str(210_000_000_000_000_000 + c)
        name = f"channel-{c}"
        path = folder / f"Doppel Scale Server - {name}.json"
        tmp = path.with_suffix(".tmp")
        next_id = 1_200_000_000_000_000_000 + c * 100_000_000
        written = 0
        last_id: str | None = None
        t = t0
        with tmp.open("w", encoding="utf-8") as fh:
            header = dce.header(
                GUILD_ID,
                "Doppel Scale Server",
                channel_id,
                name,
                "Text Channels",
                datetime(2026, 11, 1, tzinfo=UTC),
            )
            fh.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "messages": [\n')
            while written < per_channel:
                topic = rng.choice(TOPICS)
                k = rng.randint(2, 4)
                speakers: list[LargeMember] = [people[0]] if rng.random() < join else []
                while len(speakers) < k:
                    pick = others[bisect.bisect_left(cum, rng.random() * cum[-1])]
                    if pick not in speakers:
                        speakers.append(pick)
                prev: LargeMember | None = None
                for _ in range(rng.randint(4, 10)):
                    if written >= per_channel:
                        break
                    choices = [s for s in speakers if s is not prev] if rng.random() < 0.85 else speakers
                    m = prev = rng.choice(choices)
                    t += timedelta(seconds=rng.randint(15, 240))
                    msg_id = str(next_id)
                    next_id += 1
                    reply = rng.random() < 0.2 and last_id is not None
                    content = m.say(rng, topic)
                    reactions = [dce.reaction("😂", "joy", rng.randint(1, 4))] if rng.random() < 0.15 else []
                    msg = dce.message(
                        msg_id,
                        t,
                        content,
                        dce.author(m.id, m.name, m.nickname),
                        reply_to=(last_id, channel_id, GUILD_ID) if reply and last_id else None,
                        reactions=reactions,
                    )
                    fh.write(("," if written else "") + json.dumps(msg, ensure_ascii=False) + "\n")
                    counts[m.id] = counts.get(m.id, 0) + 1
                    written += 1
                    last_id = msg_id
                t += timedelta(minutes=rng.randint(40, 300))
            fh.write(f'], "messageCount": {written}}}\n')
        tmp.replace(path)
        paths.append(path)
    return {
        "paths": [str(p) for p in paths],
        "members": [m.id for m in people],
        "messages": sum(counts.values()),
        "per_author": counts,
    }
