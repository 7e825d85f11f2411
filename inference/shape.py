"""How long a member's messages run and whether they span lines: a persona's reply is held to the same shape.

Measured on real chat (issue 32): personas wrote two lines where the member writes one, and ran longer; a
classifier told them apart by that alone. The member's own stored messages give the shape; the reply's token budget
and line count follow it, in every mode that knows the member (retrieval, adapter, hybrid), in process and through
a persona server alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from inference.requests import GenParams, PersonaRequest

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


@dataclass(frozen=True)
class MessageShape:
    """A member's message shape: a long message's length, and how often a message spans lines."""

    long_chars: int
    multi_line: float
    messages: int

    def fit(self, params: GenParams) -> GenParams:
        """`params` held to this shape (never loosened: a caller's smaller budget stays)."""
        tokens = max(MIN_TOKENS, math.ceil(self.long_chars / CHARS_PER_TOKEN) + SLACK_TOKENS)
        lines = 1 if self.multi_line < MULTI_LINE else 0
        return dataclasses.replace(
            params,
            max_tokens=min(params.max_tokens, tokens),
            max_lines=lines if not params.max_lines else min(params.max_lines, lines or params.max_lines),
        )


def shape_of(texts: Sequence[str]) -> MessageShape | None:
    """The shape of these messages; None for too few to say."""
    sized = sorted(len(t.strip()) for t in texts if t.strip())
    if len(sized) < MIN_MESSAGES:
        return None
    long_chars = sized[min(len(sized) - 1, int(QUANTILE * len(sized)))]
    multi = sum(1 for t in texts if "\n" in t.strip()) / len(sized)
    return MessageShape(long_chars=long_chars, multi_line=round(multi, 3), messages=len(sized))


class ShapeSource(Protocol):
    """What knows a member's message shape (the retriever, which holds their messages)."""

    async def shape(self, member_id: str) -> MessageShape | None: ...


async def fitted(source: ShapeSource | None, persona: PersonaRequest, params: GenParams) -> GenParams:
    """`params` held to the member's shape when the persona is theirs (adapter or retrieval); the bare base is not."""
    if source is None or not (persona.uses_adapters or persona.uses_retrieval):
        return params
    shape = await source.shape(persona.member_id)
    return shape.fit(params) if shape is not None else params
