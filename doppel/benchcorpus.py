"""The fidelity benchmark's real chat: `#ubuntu` IRC logs, converted to DiscordChatExporter JSON, and its panel."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.errors import UserFacingError
from doppel import dceformat as dce

DATA = Path(__file__).parent / "benchdata" / "ubuntu_irc.jsonl.gz"
# Channel bots answer with canned factoids: never a panel member, never a persona.
BOTS = frozenset({"ubottu", "ubotu", "ubot5", "ubot2", "ubot3", "ubot4", "ubuntulog", "ubuntu-bot"})
GUILD = "300000000000000000"
CHANNEL_BASE = 3_000_000_000_000_000_000
_ADDRESS = re.compile(r"^([^\s:,]{1,32})[:,]\s")


def load_logs(path: Path = DATA) -> list[dict[str, Any]]:
    """The shipped logs: one record per log file, lines as [minute of day, nick, text]."""
    if not path.is_file():
        raise UserFacingError(f"benchmark data missing: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def author_id(nick: str) -> str:
    """A stable snowflake-sized numeric id for an IRC nick."""
    return str(10**17 + int(hashlib.sha1(nick.encode()).hexdigest()[:14], 16) % (9 * 10**17))


def same_text(text: str) -> str:
    """A message as the held-out check compares it: whitespace runs folded, so a retrieved or sampled copy matches."""
    return " ".join(text.split())


def to_exports(logs: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """DiscordChatExporter JSON, one channel per log; "nick: ..." addressing becomes a Discord reply."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, log in enumerate(logs):
        channel_id = str(CHANNEL_BASE + k * 10_000_000)
        day = datetime.fromisoformat(str(log["date"])).replace(tzinfo=UTC)
        messages: list[dict[str, Any]] = []
        last_by_nick: dict[str, str] = {}
        prev_minute, day_offset, in_minute = -1, 0, 0
        for n, (minute, nick, text) in enumerate(log["lines"]):
            if minute < prev_minute - 60:
                day_offset += 1  # the log crossed midnight
            in_minute = in_minute + 1 if minute == prev_minute else 0
            prev_minute = minute
            ts = day + timedelta(days=day_offset, minutes=minute, seconds=min(59, in_minute * 2))
            msg_id = str(int(channel_id) + n + 1)
            m = _ADDRESS.match(text)
            ref = last_by_nick.get(m.group(1)) if m else None
            by = dce.author(author_id(nick), nick, is_bot=nick in BOTS)
            reply_to = (ref, channel_id, GUILD) if ref else None
            messages.append(dce.message(msg_id, ts, text, by, reply_to=reply_to))
            last_by_nick[nick] = msg_id
        head = dce.header(
            GUILD, "Ubuntu IRC", channel_id, "ubuntu", "IRC", datetime(2026, 11, 30, tzinfo=UTC)
        )
        export = dce.export(head, messages)
        path = folder / f"ubuntu-{log['log']}.json"
        path.write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return paths


def choose_panel(logs: Sequence[Mapping[str, Any]], size: int, member: str | None = None) -> list[str]:
    """The member (default: the most active human) and the next most active humans: `size` nicks, member first."""
    counts = Counter(nick for log in logs for _, nick, _ in log["lines"] if nick not in BOTS)
    ranked = [n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    member = member or ranked[0]
    if member not in counts:
        raise UserFacingError(f"{member!r} never speaks in the benchmark data")
    return [member, *[n for n in ranked if n != member][: size - 1]]


def select_logs(
    logs: Sequence[Mapping[str, Any]], panel: Sequence[str], max_logs: int
) -> list[dict[str, Any]]:
    """The logs where the member speaks most (all of them when `max_logs` is 0)."""
    member = panel[0]
    scored = [(sum(1 for _, n, _ in log["lines"] if n == member), i) for i, log in enumerate(logs)]
    keep = sorted(i for c, i in sorted(scored, reverse=True)[: max_logs or len(logs)] if c > 0)
    return [dict(logs[i]) for i in keep]
