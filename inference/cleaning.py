"""Output cleaning: echoed speaker prefixes removed, pings neutralised, even across streamed chunk boundaries."""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.chatformat import PLAIN_LABELS

ZWSP = "\u200b"
# Every `@` followed by something other than whitespace could start a ping (@everyone, @here, <@id>, <@!id>,
# <@&role>); a zero-width space right after it keeps the text readable and makes Discord ignore it.
_AT = re.compile(r"[@＠](?=[^\s\u200b])")


# What only a chat assistant says of itself: a persona that starts claiming it stops there (the claim is dropped).
# Identity claims and assistant stock phrases, not helpful words a real member may use ("happy to help").
ASSISTANT_PHRASES = tuple(
    f"{who} {what}"
    for who in ("i'm", "i am", "im")
    for what in (
        "an ai",
        "a chatbot",
        "a chat bot",
        "an assistant",
        "a language model",
        "an artificial",
        "a virtual assistant",
        "an ai assistant",
        "here to help",
        "here to assist",
        "smollm",
    )
) + (
    "as an ai",
    "as a language model",
    "as an assistant",
    "how can i assist",
    "how may i assist",
    "how can i help you today",
    "trained by hugging face",
    "my name is smollm",
    "i hope this helps",
)
# A sentence or line the persona already wrote, starting again: the small base model looping.
_SENTENCE_END = re.compile(r"[.!?\n]+")
# A phrase said again right after itself, with no sentence mark between ("i think i have a few more i think i have
# a few more ..."): at least this many words, of which at least PHRASE_DISTINCT differ ("ha ha ha ha" is a laugh).
PHRASE_MIN_WORDS, PHRASE_MAX_WORDS, PHRASE_DISTINCT = 4, 16, 3
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


# Where a sentence ends: its mark (and a closing quote or bracket) before a space, or a line break. "15.04" and
# "www.x.org" are not ends: no space follows their dot.
_SENTENCE_DONE = re.compile(r"[.!?\u2026]+[\"')\]]*(?=\s)|\n")
_SENTENCE_LAST = re.compile(r"[.!?\u2026]+[\"')\]]*(?=\s|$)|\n")
_CLAUSE_DONE = re.compile(r"[,;:\u2014](?=\s)")


class WholeSentences:
    """Holds back the sentence being written, so that a reply cut off by its token budget ends at a full sentence.

    Members end their messages where a thought ends; a reply stopped mid-word by its length cap ("You're right about
    upgrading to") is a tell no member writes. A reply that ends by itself (its end-of-turn token, another speaker,
    its line limit) keeps every word.
    """

    def __init__(self) -> None:
        self._said = ""
        self._held = ""

    def feed(self, text: str) -> str:
        """Take safe text; return the part up to the last finished sentence."""
        buf = self._held + text
        # A line break waits with the sentence after it: a reply that ends there has no trailing break.
        end = max(
            (m.start() if m.group() == "\n" else m.end() for m in _SENTENCE_DONE.finditer(buf)), default=0
        )
        out, self._held = buf[:end], buf[end:]
        self._said += out
        return out

    def finish(self, cut: bool) -> str:
        """The rest: all of it when the reply ended by itself; when `cut` by its budget, only whole sentences."""
        held, self._held = self._held, ""
        if not cut or not held.strip():
            return held
        end = max((m.end() for m in _SENTENCE_LAST.finditer(held)), default=0)
        if end or self._said.strip():
            return held[:end].rstrip()
        # One long sentence, cut: it ends at its last clause mark, else before its last (maybe cut) word.
        clause = max((m.start() for m in _CLAUSE_DONE.finditer(held)), default=0)
        space = held.rstrip().rfind(" ")
        keep = held[:clause] if clause else held[:space] if space > 0 else held
        return keep.rstrip(" \t,;:-\u2014")


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

    def __init__(self, persona_name: str, others: Iterable[str] = (), max_lines: int = 0) -> None:
        self.persona = persona_name.strip().lower()
        # A member who writes one line per message: the reply ends with its first line (0: any number of lines).
        self.max_lines = max_lines
        self._lines = 0
        self._line_content = False
        self.others = {o.strip().lower() for o in others if o.strip()} - {self.persona}
        self._prefix = _prefix_pattern([persona_name, *others])
        self._names = [n for n in {self.persona, *self.others} if n]
        # The made-up format's role labels among the others ("User"), as the format writes them: ChatFormat.stop
        # ends generation on them, case and all.
        self._turns = tuple(t for t in (o.strip() for o in others) if t in PLAIN_LABELS)
        self._pending = ""
        self._line_start = True
        self._emitted_any = False
        self._seen_content = False
        self._carry = ""
        self._said = ""
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
            self._line_content = self._line_content or bool(piece.strip())
            if nl >= 0 and self._line_content:
                self._lines += 1
                self._line_content = False
                if self.max_lines and self._lines >= self.max_lines:
                    self.stopped = True  # the line break is dropped with what would follow it
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
        text = self._guard(text, final)
        if text:
            self._emitted_any = True
            self._said += text
        return neutralise_mentions(text)

    def _guard(self, text: str, final: bool) -> str:
        """Cut assistant boilerplate and loops; hold back a tail that may still grow into one."""
        said = self._said
        full = (said + text).replace("\u2019", "'").lower()
        cut = _first_boilerplate(full, len(said))
        found = _words(full)  # read once: both the loop check and the hold-back use the words
        for loop in (_first_repeat(full, len(said), final), _first_phrase_loop(found, len(said))):
            if loop is not None and (cut is None or loop < cut):
                cut = loop
        if cut is not None:
            self.stopped = True
            return text[: max(0, cut - len(said))].rstrip().rstrip(",;:-\u2014").rstrip()
        if final:
            return text
        hold = _pending_tail(full, len(said), found)
        if hold is None and text.rstrip(" \t,;:-\u2014") != text:
            hold = len(said) + len(text)  # a trailing comma waits: a cut right after it would drop it
        if hold is not None:
            k = hold - len(said)
            # The space and comma before a held word wait with it (a cut drops them), and so does an `@` (its next
            # character decides a ping).
            while k and (text[k - 1].isspace() or text[k - 1] in "@\uff20,;:-\u2014"):
                k -= 1
            self._carry, text = text[k:] + self._carry, text[:k]
        return text

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
                return (
                    False  # the label may still take one space after its colon: wait for the next character
                )
            self._pending = self._pending[m.end() :]
            self._line_start = False
            return True
        if not final and "\n" not in self._pending and ":" not in head and self._could_be_label(head):
            return False
        if final and self._seen_content and "\n" not in self._pending and self._partial_turn(head):
            # The reply ran out of tokens inside the next turn's label ("\nUs"): it is dropped, as a server drops
            # the part of a stop string it already holds back.
            self._pending = ""
            return True
        self._line_start = False
        return True

    def _partial_turn(self, head: str) -> bool:
        """Whether `head`, the last line, is the start of a role label cut short ("Us" of "User:")."""
        text = head.strip(" \t")
        return bool(text) and any(f"{label}:".startswith(text) for label in self._turns)

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


def _word_starts(full: str, start: int) -> list[int]:
    return [
        i for i in range(start, len(full)) if not full[i].isspace() and (i == 0 or not full[i - 1].isalnum())
    ]


def _first_boilerplate(full: str, start: int) -> int | None:
    """Where the first assistant phrase that ends after `start` begins (None: none)."""
    best = None
    for phrase in ASSISTANT_PHRASES:
        i = full.find(phrase, max(0, start - len(phrase)))
        while i >= 0:
            if (i == 0 or not full[i - 1].isalnum()) and i + len(phrase) > start:
                best = i if best is None else min(best, i)
                break
            i = full.find(phrase, i + 1)
    return best


def _sentences(full: str) -> list[tuple[int, str]]:
    """(start, normalised text) of each sentence or line that is complete (followed by its end mark)."""
    out, pos = [], 0
    for m in _SENTENCE_END.finditer(full):
        piece = full[pos : m.start()]
        lead = len(piece) - len(piece.lstrip())
        norm = " ".join(piece.split())
        if norm:
            out.append((pos + lead, norm))
        pos = m.end()
    return out


def _loopable(norm: str) -> bool:
    """Long enough that saying it twice is a loop, not "ok ok"."""
    return len(norm) >= 8 or len(norm.split()) >= 3


def _first_repeat(full: str, start: int, final: bool = False) -> int | None:
    """Where a complete sentence (not a short one) that repeats an earlier one begins, when it ends after `start`."""
    seen: set[str] = set()
    sentences = _sentences(full)
    if final:  # at the end the last sentence is complete without its end mark
        tail_at = max((m.end() for m in _SENTENCE_END.finditer(full)), default=0)
        tail = " ".join(full[tail_at:].split())
        if tail:
            sentences.append((tail_at + len(full[tail_at:]) - len(full[tail_at:].lstrip()), tail))
    for begin, norm in sentences:
        if norm in seen and _loopable(norm) and begin + len(norm) >= start:
            return begin
        seen.add(norm)
    return None


def _words(full: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(0)) for m in _WORD.finditer(full)]


def _is_phrase(words: list[str]) -> bool:
    return len(words) >= PHRASE_MIN_WORDS and len(set(words)) >= PHRASE_DISTINCT


def _first_phrase_loop(found: list[tuple[int, str]], start: int) -> int | None:
    """Where a phrase that repeats the one right before it begins, when that repeat is complete after `start`."""
    words = [w for _, w in found]
    for i in range(len(words)):
        for n in range(PHRASE_MIN_WORDS, min(PHRASE_MAX_WORDS, i) + 1):
            if i + n > len(words) or not _is_phrase(words[i - n : i]):
                continue
            end = found[i + n - 1][0] + len(words[i + n - 1])
            if words[i : i + n] == words[i - n : i] and end > start:
                return found[i][0]
    return None


def _could_repeat_phrase(words: list[str], i: int, open_end: bool) -> bool:
    """Whether the words from `i` on could still grow into a repeat of the phrase just before them.

    `open_end`: the text stops inside its last word, which may still grow ("thin" -> "think")."""
    rest = words[i:]
    for n in range(max(PHRASE_MIN_WORDS, len(rest)), min(PHRASE_MAX_WORDS, i) + 1):
        before = words[i - n : i - n + len(rest)]
        if not _is_phrase(words[i - n : i]) or before[:-1] != rest[:-1]:
            continue
        if before[-1] == rest[-1] or (open_end and before[-1].startswith(rest[-1])):
            return True
    return False


def _pending_tail(full: str, start: int, found: list[tuple[int, str]]) -> int | None:
    """The earliest word start at or after `start` whose rest may still grow into an assistant phrase or a repeat."""
    sentences = _sentences(full)
    done = {norm for _, norm in sentences if _loopable(norm)}
    last_end = 0
    for m in _SENTENCE_END.finditer(full):
        last_end = m.end()
    words = [w for _, w in found]
    open_end = bool(found) and found[-1][0] + len(found[-1][1]) == len(full)
    phrase_from = len(found) - PHRASE_MAX_WORDS
    phrase_at = {pos: k for k, (pos, _) in enumerate(found) if k >= phrase_from}
    for i in _word_starts(full, start):
        rest = " ".join(full[i:].split())
        if not rest:
            continue
        if any(p.startswith(rest) for p in ASSISTANT_PHRASES):
            return i
        if i >= last_end and any(d.startswith(rest) for d in done):
            return i
        if i in phrase_at and _could_repeat_phrase(words, phrase_at[i], open_end):
            return i
    return None
