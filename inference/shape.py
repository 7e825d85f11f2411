"""How long a member's messages run and whether they span lines: a persona's reply is held to the same shape.

Measured on real chat (issue 32): personas wrote two lines where the member writes one, and ran longer; a
classifier told them apart by that alone. The member's own stored messages give the shape; the reply's token budget
and line count follow it, in every mode that knows the member (retrieval, adapter, hybrid), in process and through
a persona server alike.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from inference.cleaning import WholeSentences
from inference.requests import GenParams, Habits, PersonaRequest

# A reply may run to the member's 90th-percentile message length: their long messages stay possible.
QUANTILE = 0.9
# Characters per token of chat text for the small bases served here (SmolLM2's tokenizer on #ubuntu: ~3.6).
CHARS_PER_TOKEN = 3.0
# Room for a label or a word cut at the end; and a floor, so a terse member's persona can still say something.
SLACK_TOKENS = 4
MIN_TOKENS = 12
# Below this share of multi-line messages a member writes one line per message, and so does their persona.
MULTI_LINE = 0.2
MIN_MESSAGES = 20
# "name: text" or "name, text": a message addressed to someone (IRC's and Discord's plain-text habit).
_ADDRESS = re.compile(r"([^\s:,]{1,32})([:,])(\s+)")


@dataclass(frozen=True)
class MessageShape:
    """A member's message shape: a long message's length, and how often a message spans lines."""

    long_chars: int
    multi_line: float
    messages: int
    habits: Habits | None = None

    def fit(self, params: GenParams, habits: bool = False) -> GenParams:
        """`params` held to this shape (never loosened: a caller's smaller budget stays), and to the member's habits."""
        tokens = max(MIN_TOKENS, math.ceil(self.long_chars / CHARS_PER_TOKEN) + SLACK_TOKENS)
        lines = 1 if self.multi_line < MULTI_LINE else 0
        return dataclasses.replace(
            params,
            max_tokens=min(params.max_tokens, tokens),
            max_lines=lines if not params.max_lines else min(params.max_lines, lines or params.max_lines),
            habits=(params.habits or self.habits) if habits else params.habits,
        )


def shape_of(texts: Sequence[str]) -> MessageShape | None:
    """The shape of these messages; None for too few to say."""
    sized = sorted(len(t.strip()) for t in texts if t.strip())
    if len(sized) < MIN_MESSAGES:
        return None
    long_chars = sized[min(len(sized) - 1, int(QUANTILE * len(sized)))]
    multi = sum(1 for t in texts if "\n" in t.strip()) / len(sized)
    return MessageShape(
        long_chars=long_chars, multi_line=round(multi, 3), messages=len(sized), habits=habits_of(texts)
    )


def habits_of(texts: Sequence[str]) -> Habits:
    """How often these messages start lowercase, end with one full stop, and address someone with a colon."""
    lower = upper = period = colon = comma = 0
    for text in (t.strip() for t in texts):
        if not text:
            continue
        m = _ADDRESS.match(text)
        if m:
            colon, comma = colon + (m.group(2) == ":"), comma + (m.group(2) == ",")
        body = text[m.end() :] if m else text
        lower, upper = lower + body[:1].islower(), upper + body[:1].isupper()
        period += text.endswith(".") and not text.endswith("..")
    return Habits(
        lower_start=round(lower / max(1, lower + upper), 3),
        period_end=round(period / max(1, len(texts)), 3),
        address_colon=round(colon / (colon + comma), 3) if colon + comma else 0.5,
    )


class HabitFit:
    """Streams a reply in its member's habits, as often as they have them: a lowercase first letter, no closing
    full stop, "name:" rather than "name," when addressing someone.

    Chat is written that way (on #ubuntu 84-89% of the most active members' messages start lowercase and 1% end with
    a full stop); an instruction-tuned base capitalises and punctuates every reply, which tells it apart at a glance.
    """

    def __init__(self, habits: Habits, names: Iterable[str], seed: int | None) -> None:
        rng = random.Random(seed)  # the reply's own seed: the same request gets the same choices
        self.lower = rng.random() < habits.lower_start
        self.keep_period = rng.random() < habits.period_end
        self.colon = rng.random() < habits.address_colon
        self.names = {n.strip().lower() for n in names if n.strip()}
        self._head = ""
        self._started = False
        self._stop = ""

    def feed(self, text: str) -> str:
        """Take clean text; return what is decided."""
        if not self._started:
            self._head += text
            text = self._start(final=False)
        return self._hold_stop(text)

    def finish(self) -> str:
        """The rest of the reply."""
        out = self._hold_stop(self._start(final=True) if not self._started else "")
        stop, self._stop = self._stop, ""
        return out + (stop if self.keep_period else "")

    def _start(self, final: bool) -> str:
        """The head once its address and first letter are known ("" while they may still change)."""
        head = self._head
        if not final and len(head) <= 34 and not any(c.isspace() for c in head):
            return ""  # the first word may still turn out to be "name:"
        m = _ADDRESS.match(head)
        prefix = ""
        if m and m.group(1).lower() in self.names:
            prefix = m.group(1) + (":" if self.colon else ",") + m.group(3)
            head = head[m.end() :]
        if not final and len(head) < 2:
            return ""  # the first letter and the one after it decide ("I ", "USB")
        first, second = head[:1], head[1:2]
        keep = (
            not self.lower
            or not first.isupper()
            or second.isupper()
            or (first == "I" and not second.isalpha())
        )
        self._started, self._head = True, ""
        return prefix + (head if keep else first.lower() + head[1:])

    def _hold_stop(self, text: str) -> str:
        """Hold back a closing full stop until more text comes (an ellipsis passes)."""
        text, self._stop = self._stop + text, ""
        if text.endswith(".") and not text.endswith(".."):
            text, self._stop = text[:-1], "."
        return text


class Polish:
    """What a clean reply goes through as it streams: whole sentences at the budget's cut, then the member's habits."""

    def __init__(self, params: GenParams, names: Iterable[str], whole_sentences: bool) -> None:
        self.whole = WholeSentences() if whole_sentences else None
        self.habits = HabitFit(params.habits, names, params.seed) if params.habits else None

    def feed(self, text: str) -> str:
        """Take clean text; return what may be shown."""
        if text and self.whole is not None:
            text = self.whole.feed(text)
        if text and self.habits is not None:
            text = self.habits.feed(text)
        return text

    def finish(self, cut: bool) -> str:
        """The rest, once generation is over; `cut`: it ran out of tokens."""
        text = self.whole.finish(cut) if self.whole is not None else ""
        if self.habits is not None:
            text = self.habits.feed(text) + self.habits.finish()
        return text


class ShapeSource(Protocol):
    """What knows a member's message shape (the retriever, which holds their messages)."""

    async def shape(self, member_id: str) -> MessageShape | None: ...


async def fitted(
    source: ShapeSource | None, persona: PersonaRequest, params: GenParams, habits: bool = False
) -> GenParams:
    """`params` held to the member's shape when the persona is theirs (adapter or retrieval); the bare base is not."""
    if source is None or not (persona.uses_adapters or persona.uses_retrieval):
        return params
    shape = await source.shape(persona.member_id)
    return shape.fit(params, habits) if shape is not None else params
