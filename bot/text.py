"""Plain-text rendering for Discord: mention neutralising, progress bars, consent summaries, truncation."""

from __future__ import annotations

import re
from collections.abc import Iterable

MESSAGE_LIMIT = 2000
ZWSP = "\u200b"
_MASS = re.compile(r"@(everyone|here)", re.IGNORECASE)
_TAG = re.compile(r"<(@[!&]?|#)(\d+)>")

SCOPE_TEXT = {
    "train": "your messages are recorded and may train your persona",
    "chat": "other members may chat with your persona",
    "join": "your persona may join conversations unprompted, at your own pace, in channels the admins opened to it "
    "(needs chat too; never while you are writing there; `/join silence` mutes it)",
}


def neutralise(text: str) -> str:
    """Break @everyone/@here and <@id> tags so generated text can never ping, even if mentions were allowed."""
    text = _MASS.sub(lambda m: "@" + ZWSP + m.group(1), text)
    return _TAG.sub(lambda m: "<" + m.group(1) + ZWSP + m.group(2) + ">", text)


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Fit `text` into one Discord message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def progress_bar(done: float, total: float, width: int = 20) -> str:
    """A text bar like `[######--------------] 30%`."""
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = round(frac * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac:.0%}"


def duration(seconds: float | None) -> str:
    """Short human duration: `42 s`, `3 min 5 s`, `1 h 2 min`."""
    if seconds is None or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def consent_summary(scopes: Iterable[str], upload_only: bool = False) -> str:
    """What a member has agreed to, one line per scope (`upload_only`: `train` covers uploaded exports only)."""
    granted = set(scopes)
    lines = [f"{'✅' if s in granted else '❌'} **{s}**: {text}" for s, text in SCOPE_TEXT.items()]
    if "train" in granted and upload_only:
        lines[0] = f"✅ **train**: {UPLOAD_ONLY_TEXT}"
    if not granted:
        lines.append("Nothing of yours is recorded.")
    return "\n".join(lines)


UPLOAD_ONLY_TEXT = (
    "the exports you uploaded are stored and may train your persona; your live messages are **not** recorded "
    "(press **Opt in to training** to record them too)"
)

UPLOAD_CONSENT = (
    "**Importing this export means you agree that:**\n"
    "• your {own} messages in it are stored, encrypted with a key of your own (the {others} messages by other "
    "people in the file are dropped and never stored);\n"
    "• they may train an AI persona of you (`train` consent), which a member or an admin can start with "
    "`/persona train`; nobody can chat with it unless you also allow chat;\n"
    "• **Import only** does not record anything you write on this server from now on; **Import and record my "
    "messages here too** also opts you in to recording in the channels the admins chose.\n"
    "You can withdraw at any time: `/doppel consent` → Opt out deletes every stored message of yours, "
    "`/doppel forget` deletes everything."
)


WHAT_IS_STORED = (
    "**What Doppel stores** (only with your `train` consent):\n"
    "• your messages in channels the server admins allowed, encrypted at rest with a key of your own;\n"
    "• edits and deletions are mirrored; messages of members who did not opt in are never stored;\n"
    "• your name, display name and avatar link, your consent choices and their history (audit);\n"
    "• personas (LoRA adapters) trained on your messages, and 👍/👎 feedback on persona replies.\n"
    "• where you silenced your persona's joining in (`/join silence`), and channels you opened to it as an admin.\n"
    "`/doppel mydata` sends you all of it; `/doppel forget` deletes all of it, including any persona "
    "trained on your messages."
)

POLICY_NOTICE = (
    "**Before recording is turned on, please read:**\n"
    "Discord's Developer Policy does not allow training machine-learning models on message content obtained "
    "through Discord's API without Discord's express permission, and its Developer Terms require deleting data "
    "on request and encrypting it at rest. Doppel records only members who opt in with the `train` scope, "
    "encrypts their messages, and erases everything (including trained personas) on request. By pressing "
    "**I acknowledge** you confirm that this server has the permission it needs and turn recording on for the "
    "allowed channels. Members can also upload their own DiscordChatExporter export with `/doppel upload`."
)
