"""Output cleaning: echoed speaker prefixes removed, pings neutralised, even across streamed chunk boundaries."""

from __future__ import annotations

import re
from collections.abc import Iterable

ZWSP = "\u200b"
# Every `@` followed by something other than whitespace could start a ping (@everyone, @here, <@id>, <@!id>,
# <@&role>); a zero-width space right after it keeps the text readable and makes Discord ignore it.
_AT = re.compile(r"[@＠](?=[^\s\u200b])")


def neutralise_mentions(text: str) -> str:
    """Make every possible mention inert by putting a zero-width space after its `@`."""
    return _AT.sub(lambda m: m.group(0) + ZWSP, text)


def _prefix_pattern(names: Iterable[str]) -> re.Pattern[str]:
    alts = sorted({re.escape(n.strip()) for n in names if n and n.strip()}, key=len, reverse=True)
    if not alts:
        alts = [r"(?!x)x"]
    # "Alice:", "**Alice**:", "Alice (AI):", "[Alice]:" as the model may echo the transcript's speaker labels.
    return re.compile(
        r"^[ \t]*[\*_\[]*(?P<name>" + "|".join(alts) + r")[\*_\]]*(?:[ \t]*\((?:AI|bot|ai)\))?[ \t]*:[ \t]?",
        re.IGNORECASE,
    )


def strip_speaker_prefix(text: str, persona_name: str, others: Iterable[str] = ()) -> str:
    """Remove a leading "Name:" / "Name (AI):" label the model echoed (whole-text form of StreamCleaner)."""
    cleaner = StreamCleaner(persona_name, others)
    return cleaner.feed(text) + cleaner.finish()


class StreamCleaner:
    """Incremental cleaner: feed raw chunks, get safe text; `stopped` turns true when another speaker's turn begins."""

    def __init__(self, persona_name: str, others: Iterable[str] = ()) -> None:
        self.persona = persona_name.strip().lower()
        self.others = {o.strip().lower() for o in others if o.strip()} - {self.persona}
        self._prefix = _prefix_pattern([persona_name, *others])
        self._names = [n for n in {self.persona, *self.others} if n]
        self._pending = ""
        self._line_start = True
        self._emitted_any = False
        self._seen_content = False
        self._carry = ""
        self.stopped = False

    def feed(self, chunk: str) -> str:
        """Take a raw chunk; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += chunk
        return self._drain(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation (trailing whitespace dropped)."""
        if self.stopped:
            self._pending = ""
            return ""
        out = self._drain(final=True)
        self._pending = self._carry = ""
        return out

    def _drain(self, final: bool) -> str:
        out: list[str] = []
        while self._pending and not self.stopped:
            if self._line_start:
                if not self._resolve_line_start(final):
                    break
                continue
            nl = self._pending.find("\n")
            cut = len(self._pending) if nl < 0 else nl + 1
            piece, self._pending = self._pending[:cut], self._pending[cut:]
            self._line_start = nl >= 0
            self._seen_content = self._seen_content or bool(piece.strip())
            out.append(piece)
        text = self._carry + "".join(out)
        self._carry = ""
        if not self._emitted_any:
            text = text.lstrip()
        if final or self.stopped:
            text = text.rstrip()
        else:
            # Hold back what could still change: trailing whitespace (dropped if the reply ends there) and a
            # trailing `@` (the next character decides whether it could ping).
            body = text.rstrip()
            while body.endswith(("@", "\uff20")):
                body = body[:-1].rstrip()
            self._carry, text = text[len(body) :], body
        if text:
            self._emitted_any = True
        return neutralise_mentions(text)

    def _resolve_line_start(self, final: bool) -> bool:
        """Decide on a line's speaker label; False means more text is needed first."""
        head = self._pending.split("\n", 1)[0]
        m = self._prefix.match(head)
        if m:
            name = m.group("name").strip().lower()
            if name != self.persona and self._seen_content:
                # The model started writing someone else's turn: the persona's message ends here.
                self.stopped = True
                return True
            if not final and m.end() == len(self._pending):
                return False  # the label may still take one space after its colon: wait for the next character
            self._pending = self._pending[m.end() :]
            self._line_start = False
            return True
        if not final and "\n" not in self._pending and ":" not in head and self._could_be_label(head):
            return False
        self._line_start = False
        return True

    def _could_be_label(self, head: str) -> bool:
        """Whether `head` may still grow into a "Name:" / "Name (AI):" label (only then is text held back)."""
        text = head.lstrip(" \t*_[").lower()
        if not text:
            return True
        for name in self._names:
            if name.startswith(text):
                return True
            if text.startswith(name):
                rest = text[len(name) :].lstrip("*_] \t")
                if not rest or any(tag.startswith(rest) for tag in ("(ai)", "(bot)")):
                    return True
        return False
