"""Prompt building with the shared chat format: oldest context dropped first to fit the token budget."""

from __future__ import annotations

import pytest

from core.chatformat import ChatFormat, Utterance
from inference.errors import RequestError
from inference.prompting import build_prompt

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FMT = ChatFormat(template=TEMPLATE, eos_token="<|im_end|>")


def words(text: str) -> list[int]:
    return [len(w) for w in text.split()]  # one "token" per word: predictable budgets


def make(n: int) -> list[Utterance]:
    return [Utterance(str(i % 3), f"user{i % 3}", f"message number {i} here") for i in range(n)]


def test_everything_fits_when_under_budget() -> None:
    p = build_prompt(
        FMT, words, persona_id="0", persona_name="user0", channel_name="c", context=make(4), budget=500
    )
    assert p.context_used == 4 and "message number 0" in p.text and p.text.endswith("<|im_start|>assistant\n")
    assert p.speakers == ("user1", "user2")


def test_oldest_messages_are_dropped_first() -> None:
    ctx = make(40)
    p = build_prompt(
        FMT, words, persona_id="0", persona_name="user0", channel_name="c", context=ctx, budget=120
    )
    assert len(p.tokens) <= 120
    assert 0 < p.context_used < 40
    assert "message number 39 here" in p.text and "message number 0 here" not in p.text
    # Maximal: one more message would not fit.
    more = build_prompt(
        FMT,
        words,
        persona_id="0",
        persona_name="user0",
        channel_name="c",
        context=ctx[-(p.context_used + 1) :],
        budget=10_000,
    )
    assert len(more.tokens) > 120


def test_examples_go_before_context_and_a_huge_last_message_keeps_its_end() -> None:
    ex = ["an example " * 30]
    p = build_prompt(
        FMT,
        words,
        persona_id="0",
        persona_name="user0",
        channel_name="c",
        context=make(3),
        budget=60,
        examples=ex,
    )
    assert "an example" not in p.text and len(p.tokens) <= 60
    huge = [Utterance("1", "bob", "start " + "word " * 500 + "THE END")]
    p = build_prompt(
        FMT, words, persona_id="0", persona_name="user0", channel_name="c", context=huge, budget=80
    )
    assert len(p.tokens) <= 80 and "THE END" in p.text


def test_budget_below_the_system_prompt_is_a_clear_error() -> None:
    with pytest.raises(RequestError, match="system prompt alone"):
        build_prompt(
            FMT, words, persona_id="0", persona_name="user0", channel_name="c", context=make(2), budget=5
        )


def test_examples_are_the_members_own_earlier_turns_not_an_instruction() -> None:
    from core.chatformat import EXAMPLE_CUE, with_examples

    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "bob: hi"}]
    got = with_examples(messages, ["closest  one", "second", "  "])
    assert got[0] == messages[0] and got[-1] == messages[-1]
    assert [m["role"] for m in got[1:-1]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in got[1:-1]] == [EXAMPLE_CUE, "second", EXAMPLE_CUE, "closest one"]
    assert "sys" == got[0]["content"], "the system prompt is not turned into an instruction about examples"
    assert with_examples(messages, []) == messages
