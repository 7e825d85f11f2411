"""A persona on a base without a chat template ends its reply where the next turn starts, trained or not (issue 43)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from core.chatformat import CHATML_TEMPLATE, PLAIN_LABELS, PLAIN_TEMPLATE, ChatFormat, Utterance
from core.settings import Settings
from inference.cleaning import StreamCleaner
from inference.prompting import build_prompt
from inference.requests import GenParams, PersonaRequest
from tests.helpers.plainbase import EOS, LINES, NAMES, build_plain_base

CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]
# A line that opens a turn of the plain format; a line that opens another turn (its role labels or another name).
ROLE_LINE = re.compile(r"(?m)^[ \t]*(?:" + "|".join(PLAIN_LABELS) + r")[ \t]*:")
TURN_LINE = re.compile(r"(?m)^[ \t]*(?:" + "|".join((*PLAIN_LABELS, *NAMES)) + r")[ \t]*:")
SEEDS = range(24)
OTHERS = ("Bob", *PLAIN_LABELS)


def clean(text: str, size: int, others: Sequence[str] = OTHERS) -> tuple[str, bool]:
    """`text` through a cleaner in chunks of `size`: what it shows and whether it stopped."""
    cleaner = StreamCleaner("Alice", others)
    out = "".join(cleaner.feed(text[i : i + size]) for i in range(0, len(text), size)) + cleaner.finish()
    return out, cleaner.stopped


# -- the stream cleaner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_a_role_line_ends_the_reply_however_it_is_chunked(size: int) -> None:
    # The issue's own sample: the untrained base writes the next speakers' turns after its line.
    assert clean("Hello?\nUser:\nhi?\nAssistant:\nHi\nUser:\n", size) == ("Hello?", True)
    assert clean("ok lol\nUser: where?", size) == ("ok lol", True)
    assert clean("sure\nSystem:\nYou are", size) == ("sure", True)
    # The persona's own role starting again after its line is a new turn too.
    assert clean("nm\nAssistant:\nnm again", size) == ("nm", True)
    # Before anything was said, the persona's role label is an echo of the prompt's: dropped, the reply kept.
    assert clean("Assistant:\nheyy", size) == ("heyy", False)


def test_a_partial_label_is_held_back_and_dropped_at_the_end() -> None:
    cleaner = StreamCleaner("Alice", OTHERS)
    assert cleaner.feed("sure\nUs") == "sure"  # "\nUs" may become "\nUser:"
    assert cleaner.feed("er") == ""
    assert cleaner.feed(":\nhi") == "" and cleaner.stopped
    # The label never completes: what it turned into is shown.
    cleaner = StreamCleaner("Alice", OTHERS)
    assert cleaner.feed("sure\nUs") == "sure"
    assert cleaner.feed("ually yes") + cleaner.finish() == "\nUsually yes"
    # The token budget ends inside the label: the start of the next turn is not part of the reply.
    for tail in ("\nU", "\nUs", "\nUser", "\nUser ", "\nAssist", "\nSys"):
        assert clean("sure" + tail, 1) == ("sure", False), tail
        assert clean("sure" + tail, 100) == ("sure", False), tail
    # Only the labels as the format writes them: a member's own last line stays.
    assert clean("miss\nu", 1)[0] == "miss\nu"
    assert clean("who won?\nus", 1)[0] == "who won?\nus"
    assert clean("Us", 1)[0] == "Us", "a reply that is only a word is not a label cut short"


def test_without_the_made_up_labels_a_role_like_line_is_the_members_own() -> None:
    """A model's own template opens turns with its own markers: "User:" in a reply is then just text."""
    text = "check the config\nUser: admin\nSystem: arch btw"
    assert clean(text, 1, others=("Bob",)) == (text, False)
    assert clean("sure\nUs", 1, others=("Bob",))[0] == "sure\nUs"


def test_the_prompt_hands_the_cleaner_the_labels_of_the_made_up_format_only() -> None:
    def tokenize(text: str) -> list[int]:
        return list(range(len(text.split())))

    def speakers(fmt: ChatFormat) -> tuple[str, ...]:
        prompt = build_prompt(
            fmt,
            tokenize,
            persona_id="10",
            persona_name="Alice",
            channel_name="general",
            context=CONTEXT,
            budget=400,
            style="plain+names",
        )
        return prompt.speakers

    assert speakers(ChatFormat(template=PLAIN_TEMPLATE, eos_token="</s>")) == ("Bob", "Carol", *PLAIN_LABELS)
    assert speakers(ChatFormat(template=CHATML_TEMPLATE, eos_token="<|im_end|>")) == ("Bob", "Carol")


# -- a tiny template-less base, served ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_plain_base(tmp_path_factory.mktemp("plainbase"))


class MemberMessages:
    """The member's past messages as the retriever hands them over (its ranking is test_retrieval_persona's)."""

    async def examples(self, member_id: str, context: Sequence[Utterance], k: int) -> list[str]:
        return list(LINES[:k])

    async def shape(self, member_id: str) -> None:
        return None  # unknown: the reply's length and lines are left to the format's stops under test

    def forget(self, member_id: str) -> bool:
        return False


def persona(mode: str) -> PersonaRequest:
    return PersonaRequest("10", "Ada", "general", mode, (), "g1")  # type: ignore[arg-type]


def sampled(seed: int) -> GenParams:
    return GenParams(max_tokens=48, temperature=1.0, seed=seed)


def test_the_tiny_base_writes_other_turns_unless_stopped(plain_base: Path) -> None:
    """Without the turn stops the base writes the next turns (the issue); with ChatFormat.stop as strings, never."""
    from llama_cpp import Llama

    fmt = ChatFormat.from_gguf(plain_base)
    assert fmt.source == "default:plain"
    llm = Llama(model_path=str(plain_base), n_ctx=512, n_threads=1, verbose=False)
    try:
        prompt = build_prompt(
            fmt,
            lambda t: llm.tokenize(t.encode(), add_bos=False, special=True),
            persona_id="10",
            persona_name="Ada",
            channel_name="general",
            context=CONTEXT,
            budget=400,
            examples=LINES[:3],
        )

        def replies(stop: list[str]) -> list[str]:
            out = []
            for seed in SEEDS:
                res = llm.create_completion(
                    prompt.tokens, max_tokens=48, temperature=1.0, seed=seed, stop=stop
                )
                out.append(str(res["choices"][0]["text"]))  # type: ignore[index]
            return out

        unstopped = replies([EOS])
        stopped = replies(fmt.stop)
    finally:
        llm.close()
    assert sum(bool(ROLE_LINE.search(r)) for r in unstopped) >= len(SEEDS) // 2, unstopped
    # Stop strings match text across token boundaries ("?\n" may be one token). A label at the very start has no
    # newline before it: that one, and other members' names, are the cleaner's (below).
    assert not [r for r in stopped if any(f"\n{label}:" in r for label in PLAIN_LABELS)]
    assert sum(bool(r.strip()) for r in stopped) >= len(SEEDS) // 2, "the reply before the next turn is kept"


def _check(replies: dict[str, list[str]]) -> None:
    for mode, texts in replies.items():
        assert len(texts) == len(SEEDS)
        assert not [t for t in texts if TURN_LINE.search(t)], mode
        assert sum(bool(t.strip()) for t in texts) >= len(SEEDS) // 2, (mode, texts)


def test_in_process_the_retrieval_and_base_personas_never_write_a_role_line(
    small_settings: Settings, plain_base: Path
) -> None:
    from inference.engine import Engine

    async def run() -> dict[str, list[str]]:
        async with Engine(small_settings, plain_base, retriever=MemberMessages()) as engine:
            return {
                mode: [await engine.reply(persona(mode), CONTEXT, sampled(s)).text() for s in SEEDS]
                for mode in ("retrieval", "base")
            }

    _check(asyncio.run(run()))


@pytest.fixture(scope="module")
def plain_server(plain_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-server on the tiny template-less base, no adapters."""
    from tests.helpers.llama_server import running_server, server_binary

    log = tmp_path_factory.mktemp("plainserver") / "llama-server.log"
    with running_server(server_binary(), plain_base, [], log=log) as url:
        yield url


# The first server test may build llama-server (about 8 minutes on 2 cores, once; cached after).
@pytest.mark.timeout(2700)
def test_through_a_persona_server_the_replies_never_write_a_role_line(
    small_settings: Settings, plain_base: Path, plain_server: str
) -> None:
    from inference.server import ServerEngine

    settings = dataclasses.replace(
        small_settings, model=dataclasses.replace(small_settings.model, base_gguf=str(plain_base))
    )

    async def run() -> dict[str, list[str]]:
        async with ServerEngine(
            settings, retriever=MemberMessages(), url=plain_server, flavour="llama.cpp"
        ) as engine:
            return {
                mode: [
                    "".join([c async for c in engine.reply(persona(mode), CONTEXT, sampled(s))])
                    for s in SEEDS
                ]
                for mode in ("retrieval", "base")
            }

    _check(asyncio.run(run()))
