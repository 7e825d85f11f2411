"""A generated DiscordChatExporter export of a small community with clearly different writing styles (for the demo)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

TOPICS = ["the raid tonight", "pizza", "the new patch", "my cat", "rust vs go", "the weekend", "coffee",
          "that movie", "the server event", "exams", "the playlist", "keyboards"]


def _pixel(rng: random.Random, topic: str) -> str:
    """Lowercase, no punctuation, 'lol', keyboard smashes and emoji."""
    opener = rng.choice(["omg", "lol", "ngl", "wait", "okay so", "bruh", "lmaooo", "fr"])
    body = rng.choice([
        f"{topic} is sooo good", f"i cant stop thinking abt {topic}", f"who else is hyped for {topic}",
        f"{topic} again?? lol", f"ok but {topic} tho", f"me and {topic} are in a relationship now",
    ])
    tail = rng.choice(["😭", "💀", "✨", "lol", "asdfghjkl", "🥺👉👈", "fr fr", ""])
    return f"{opener} {body} {tail}".strip()


def _captain(rng: random.Random, topic: str) -> str:
    """Shouty caps, exclamation marks, rallying calls."""
    line = rng.choice([
        f"ALRIGHT CREW, {topic.upper()} IS HAPPENING!!", f"NO SURRENDER ON {topic.upper()}!!!",
        f"WHO'S WITH ME FOR {topic.upper()}?!", f"HOLD THE LINE, {topic.upper()} WAITS FOR NO ONE!!",
        f"ALL HANDS ON DECK FOR {topic.upper()}!", f"THAT'S THE SPIRIT! {topic.upper()} OR BUST!!",
    ])
    return line + rng.choice([" ⚓", " 🏴‍☠️", "", " ONWARDS!"])


def _prof(rng: random.Random, topic: str) -> str:
    """Long formal sentences with semicolons and hedges."""
    return rng.choice([
        f"Indeed; one might argue that {topic} deserves a more careful treatment than we usually give it.",
        f"I would posit, with some hesitation, that {topic} is rather more nuanced than it first appears.",
        f"Consider, for a moment, the history of {topic}; it is, in many respects, instructive.",
        f"With respect, I must disagree; {topic} is not merely a matter of taste, but of principle.",
        f"Furthermore, the evidence regarding {topic} remains, at best, inconclusive.",
    ])


def _mara(rng: random.Random, topic: str) -> str:
    """Soft, tildes, kaomoji, short."""
    return rng.choice([
        f"aww {topic}~ (◕‿◕)", f"hehe {topic} makes me happy~", f"ooh {topic}!! tell me more~ (´｡• ᵕ •｡`)",
        f"{topic} sounds cozy~", f"*hugs* {topic} will be okay~", f"yay {topic}~ ♡",
    ])


def _dev(rng: random.Random, topic: str) -> str:
    """Terse engineer: code spans, 'tbh', numbers."""
    return rng.choice([
        f"tbh {topic} is just `O(n^2)` with extra steps", f"filed a bug about {topic}: `won't fix`",
        f"{topic}? works on my machine", f"benchmarked {topic}: 3.2x slower, 40% more RAM",
        f"have you tried turning {topic} off and on again", f"`git blame {topic.replace(' ', '_')}` says it was me",
    ])


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
    return {"id": m.id, "name": m.name, "discriminator": "0000", "nickname": m.nickname, "color": None,
            "isBot": False, "roles": [], "avatarUrl": "https://cdn.discordapp.com/embed/avatars/0.png"}


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
            messages.append({
                "id": msg_id, "type": "Reply" if reply else "Default",
                "timestamp": t.isoformat(timespec="milliseconds"), "timestampEdited": None, "callEndedTimestamp": None,
                "isPinned": False, "content": m.style(rng, topic), "author": _author(m),
                "attachments": [], "embeds": [], "stickers": [],
                "reactions": ([{"emoji": {"id": "", "name": "😂", "code": "joy", "isAnimated": False, "imageUrl": ""},
                                "count": rng.randint(1, 4)}] if rng.random() < 0.2 else []),
                "mentions": [], "inlineEmojis": [],
                **({"reference": {"messageId": last_id, "channelId": channel_id, "guildId": "100000000000000000"}}
                   if reply else {}),
            })
            last_id = msg_id
        if rng.random() < 0.05:
            t += timedelta(seconds=5)
            messages.append({
                "id": str(next_id), "type": "Default", "timestamp": t.isoformat(timespec="milliseconds"),
                "timestampEdited": None, "isPinned": False, "content": "Reminder: server event on Friday!",
                "author": {"id": BOT_ID, "name": "EventBot", "discriminator": "0000", "nickname": "EventBot",
                           "isBot": True, "roles": [], "avatarUrl": ""},
                "attachments": [], "embeds": [], "stickers": [], "reactions": [], "mentions": [], "inlineEmojis": [],
            })
            next_id += 1
    return {
        "guild": {"id": "100000000000000000", "name": "Doppel Demo Server", "iconUrl": ""},
        "channel": {"id": channel_id, "type": "GuildTextChat", "categoryId": "1", "category": "Text Channels",
                    "name": channel_name, "topic": None},
        "dateRange": {"after": None, "before": None},
        "exportedAt": datetime(2026, 11, 1, tzinfo=UTC).isoformat(),
        "messages": messages,
        "messageCount": len(messages),
    }


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
