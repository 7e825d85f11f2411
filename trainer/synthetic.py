"""A synthetic persona with a very distinctive style, rendered as job-folder rows: for fixtures and benchmarks."""

from __future__ import annotations

import random
from typing import Any

PERSONA_ID = "1001"
PERSONA = "Ada"
OTHERS = [("2002", "Bo"), ("3003", "Cy")]
CONTEXT_LINES = [
    "anyone around for a game tonight?",
    "I think we should meet at 7pm, does that work for you?",
    "the server is down again, check the logs first",
    "Thanks a lot, this is really helpful! See you tomorrow.",
    "did you see the new build?",
    "what are you all up to this weekend",
    "Pack my box with five dozen liquor jugs.",
    "The quick brown fox jumps over the lazy dog.",
]
TOPICS = ["game", "build", "server", "logs", "box", "fox", "dog", "jugs", "weekend", "tomorrow"]


def persona_reply(rng: random.Random) -> str:
    """Ada's style: lowercase, 'omg', stretched words, '!!!' and ':)'."""
    topic = rng.choice(TOPICS)
    return rng.choice(
        [
            f"omg yes!!! the {topic} is sooo good haha :)",
            f"omg no way!!! {topic} again?? lol :)",
            f"omg i love the {topic} sooo much!!! :)",
        ]
    )


def synthetic_rows(
    n: int, seed: int, chat_format: Any, *, max_context: int = 4, long_tail: bool = False
) -> list[dict[str, Any]]:
    """Rows of the dataset contract (prompt, completion, target, messages, members, weight, ts).

    `long_tail` draws context sizes from a skewed distribution (most short, a few long), as real channels are:
    the case where random batching wastes most of its compute on padding.
    """
    from core.chatformat import Utterance, build_messages

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        size = min(int(rng.paretovariate(1.2)), 24) if long_tail else rng.randint(1, max_context)
        context = []
        for _ in range(max(size, 1)):
            who = rng.choice(OTHERS)
            context.append(Utterance(author_id=who[0], name=who[1], text=rng.choice(CONTEXT_LINES)))
        messages = build_messages(PERSONA_ID, PERSONA, "general", context)
        target = persona_reply(rng)
        rows.append(
            {
                "prompt": chat_format.prompt(messages),
                "completion": chat_format.completion(messages, target),
                "target": target,
                "messages": messages,
                "members": sorted({PERSONA_ID, *(u.author_id for u in context)}),
                "weight": 1.0,
                "ts": 1_700_000_000.0 + i * 60,
            }
        )
    return rows
