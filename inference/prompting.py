"""Prompt building: the shared chat format, the persona's system prompt, recent context within a token budget."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.chatformat import (
    DEFAULT_STYLE,
    LEGACY_STYLE,
    STYLES,
    ChatFormat,
    Utterance,
    build_messages,
    with_examples,
)
from inference.errors import AdapterError, RequestError


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt, its tokens, and how much of the context fitted."""

    text: str
    tokens: list[int]
    context_used: int
    # The labels that, at a line start, end the persona's reply (the stream cleaner's `others`): the other members
    # in the context, and the made-up format's role labels (ChatFormat.turn_labels).
    speakers: tuple[str, ...]


# Sampling penalty on repeated tokens when examples are in the prompt (unless the caller chose one).
RETRIEVAL_REPEAT_PENALTY = 1.15


def trained_style(adapters: Sequence[tuple[str, float]]) -> str:
    """The prompt style the persona's adapters were trained with (meta.json beside the GGUF; in a blend the heaviest).

    A persona is served in the shape it learned: the same system prompt and speaker names as its training examples.
    No adapter, or a bare GGUF without a meta.json: the default style.
    """
    if not adapters:
        return DEFAULT_STYLE
    path = Path(max(adapters, key=lambda a: abs(a[1]))[0])
    try:
        meta = json.loads((path.parent / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return DEFAULT_STYLE
    except (OSError, ValueError) as exc:
        raise AdapterError(
            f"{path.parent / 'meta.json'}: unreadable ({exc}); retrain or re-export the adapter"
        ) from None
    config = meta.get("training_config") if isinstance(meta, dict) else None
    style = str((config or {}).get("prompt_style") or LEGACY_STYLE)
    if style not in STYLES:
        raise AdapterError(
            f"adapter {path.parent.name} was trained with prompt style {style!r}, unknown to this version"
        )
    return style


def build_prompt(
    fmt: ChatFormat,
    tokenize: Callable[[str], list[int]],
    *,
    persona_id: str,
    persona_name: str,
    channel_name: str | None,
    context: Sequence[Utterance],
    budget: int,
    examples: Sequence[str] = (),
    style: str = DEFAULT_STYLE,
) -> Prompt:
    """Render the prompt for the persona's next turn, dropping the oldest context until it fits `budget` tokens."""
    context = list(context)

    def render(ctx: Sequence[Utterance], ex: Sequence[str]) -> tuple[str, list[int]]:
        messages = with_examples(build_messages(persona_id, persona_name, channel_name, ctx, style=style), ex)
        text = fmt.prompt(messages)
        return text, tokenize(text)

    text, tokens = render(context, examples)
    start = 0
    if len(tokens) > budget and context:
        # Binary search the first context message to keep: renders O(log n) times, not n.
        lo, hi = 0, len(context) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(render(context[mid:], examples)[1]) <= budget:
                hi = mid
            else:
                lo = mid + 1
        start = lo
        text, tokens = render(context[start:], examples)
    ex = list(examples)
    while len(tokens) > budget and ex:
        # Examples are a hint; the conversation being answered matters more.
        ex.pop()
        text, tokens = render(context[start:], ex)
    if len(tokens) > budget and context:
        # Even the last message alone is too long: keep its end, the part being answered.
        last = context[-1]
        body = last.text
        while len(tokens) > budget and len(body) > 1:
            body = body[len(body) // 4 :] if len(body) > 8 else body[1:]
            text, tokens = render([Utterance(last.author_id, last.name, "…" + body)], ex)
        start = len(context) - 1
    if len(tokens) > budget:
        raise RequestError(f"the system prompt alone needs {len(tokens)} tokens, over the budget of {budget}")
    used = context[start:]
    # The format's role labels ("User:") open another turn as surely as another member's name does: the cleaner
    # ends the reply on either at a line start.
    speakers = tuple(dict.fromkeys([*(u.name for u in used if u.author_id != persona_id), *fmt.turn_labels]))
    return Prompt(text=text, tokens=tokens, context_used=len(used), speakers=speakers)
