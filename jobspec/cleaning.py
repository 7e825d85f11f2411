"""Scrubbing and normalising message text before it becomes training data."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

# Placeholders are plain words in brackets: the model learns "someone pasted a secret here", never the secret.
EMAIL = "[email]"
PHONE = "[phone]"
SECRET = "[secret]"
INVITE = "[invite]"

_INVITE_RE = re.compile(
    r"(?:https?://)?(?:www\.)?(?:discord\.gg|discord(?:app)?\.com/invite|dsc\.gg)/[A-Za-z0-9-]+", re.I
)
_URL_RE = re.compile(r"https?://[^\s<>\"]+|www\.[^\s<>\"]+", re.I)
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A phone number: optional +, 9-15 digits split by spaces, dots, dashes or brackets; not part of a longer word.
_PHONE_RE = re.compile(r"(?<![\w+])\+?\(?\d(?:[\d\s().-]{6,20})\d(?![\w])")
_DATE_RE = re.compile(r"\b(?:19|20)\d\d[-./]\d\d?[-./]\d\d?\b|\b\d\d?[-./]\d\d?[-./](?:19|20)\d\d\b")
_SECRET_RES = (
    # Discord bot/user tokens: base64 user id, timestamp, HMAC.
    re.compile(r"\b[MNO][A-Za-z\d_-]{23,27}\.[A-Za-z\d_-]{6}\.[A-Za-z\d_-]{27,40}\b"),
    re.compile(r"\bmfa\.[A-Za-z\d_-]{60,}\b"),
    re.compile(r"\b(?:sk|pk|rk)[-_](?:live[-_]|test[-_]|proj[-_])?[A-Za-z0-9_-]{16,}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWT
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),  # long hex: hashes, keys
)
# Long base64-ish runs count as secrets only when they mix letters and digits (a long word is not a key).
_B64_RE = re.compile(r"(?<![\w/+])[A-Za-z0-9+/_-]{32,}={0,2}(?![\w/+])")
_USER_MENTION_RE = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION_RE = re.compile(r"<@&\d+>")
_CHANNEL_MENTION_RE = re.compile(r"<#\d+>")
_CUSTOM_EMOJI_RE = re.compile(r"<a?:(\w+):\d+>")
_TIMESTAMP_RE = re.compile(r"<t:(\d+)(?::[tTdDfFR])?>")
_MASS_PING_RE = re.compile(r"@(everyone|here)\b")
_SPACES_RE = re.compile(r"[ \t]+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_NORM_DROP_RE = re.compile(r"[\W_]+", re.UNICODE)
_REPEAT_RE = re.compile(r"(.)\1{2,}")


@dataclass(frozen=True)
class Cleaner:
    """Turns raw message content into training text, or None when the message carries no usable words."""

    names: Mapping[str, str]
    min_chars: int = 2
    max_chars: int = 1200

    def text(self, content: str) -> str:
        """Scrubbed, mention-rendered, whitespace-normalised text (possibly empty)."""
        return tidy(scrub(render_mentions(content, self.names)))

    def message(self, content: str) -> str | None:
        """Cleaned text of one message, or None when it is empty, link-only or attachment-only."""
        cleaned = self.text(content)
        if not cleaned or is_link_only(cleaned):
            return None
        return cleaned

    def within_bounds(self, text: str) -> bool:
        """Whether a (merged) turn is long enough to learn from and short enough to be a chat reply."""
        return self.min_chars <= len(text) <= self.max_chars

    def clip(self, text: str) -> str:
        """Context turns over the bound are kept but shortened: the reply still needs what it answers."""
        if len(text) <= self.max_chars:
            return text
        return text[: max(1, self.max_chars - 1)].rstrip() + "…"


def render_mentions(text: str, names: Mapping[str, str]) -> str:
    """`<@123>` -> `@name`; role/channel mentions and mass pings neutralised so no copy can ping anyone."""
    text = _USER_MENTION_RE.sub(lambda m: "@" + names.get(m.group(1), "someone"), text)
    text = _ROLE_MENTION_RE.sub("@role", text)
    text = _CHANNEL_MENTION_RE.sub("#channel", text)
    text = _CUSTOM_EMOJI_RE.sub(lambda m: f":{m.group(1)}:", text)
    text = _TIMESTAMP_RE.sub("[time]", text)
    # A zero-width joiner keeps the look of "@everyone" while Discord no longer treats it as a ping.
    return _MASS_PING_RE.sub("@\u200d\\1", text)


def scrub(text: str) -> str:
    """Replace invite links, emails, secret-looking tokens and phone numbers with placeholders."""
    text = _INVITE_RE.sub(INVITE, text)
    text = _URL_RE.sub(_shorten_url, text)
    text = _EMAIL_RE.sub(EMAIL, text)
    for pattern in _SECRET_RES:
        text = pattern.sub(SECRET, text)
    text = _B64_RE.sub(_secret_if_mixed, text)
    return _PHONE_RE.sub(_phone_if_plausible, text)


def _shorten_url(match: re.Match[str]) -> str:
    # Paths and query strings carry tokens and private ids; the host keeps the topic ("a youtube link").
    url = match.group(0).rstrip(".,;:!?)")
    trail = match.group(0)[len(url) :]
    rest = url.split("://", 1)[-1]
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].lower()
    if "@" in host:
        host = host.rsplit("@", 1)[1]
    short = f"https://{host}" + ("/…" if len(rest) > len(host) + 1 else "")
    return short + trail


def _secret_if_mixed(match: re.Match[str]) -> str:
    token = match.group(0)
    has_digit = any(c.isdigit() for c in token)
    has_alpha = any(c.isalpha() for c in token)
    return SECRET if has_digit and has_alpha else token


def _phone_if_plausible(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = sum(c.isdigit() for c in found)
    if not 9 <= digits <= 15 or _DATE_RE.search(found):
        return found
    return PHONE


def tidy(text: str) -> str:
    """Unicode NFC, trimmed lines, collapsed runs of spaces and blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES_RE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES_RE.sub("\n\n", "\n".join(lines)).strip()


def is_link_only(text: str) -> bool:
    """True when nothing but links (and placeholders for them) is left once they are removed."""
    rest = _URL_RE.sub("", text).replace(INVITE, "").replace("/…", "")
    return not rest.strip(" \n\t<>()[]|*_~`.,")


def normalize(text: str) -> str:
    """A key for duplicate detection: case-, accent-, punctuation- and repetition-insensitive."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    folded = _REPEAT_RE.sub(r"\1\1", folded)
    return _NORM_DROP_RE.sub(" ", folded).strip()
