"""The join gate and the member's timing, pure: addressed or named without a mention (on a server of any size), the
quiet minutes, pings, one persona at most, budgets, and delays, bursts and typing speed read from the member's own
messages."""

from __future__ import annotations

import random

from inference.joingate import (
    ChannelMemory,
    Moment,
    choose,
    probability,
    topic_overlap,
    word_corpus,
)
from inference.joinhabits import OwnMessage, build_habits, sample_burst, sample_delay, typing_s

CH = "c1"
T0 = 1_700_000_000.0


def _habits(member: str, name: str, topic: str, start: float = T0 - 86400.0) -> object:
    own = []
    for k in range(60):
        at = start + k * 300.0
        # Replies 20-40 s after someone else, some turns of two messages 10 s apart (40 characters: 4 chars/s).
        own.append(
            OwnMessage(CH, at, f"{topic} thoughts number {k:02d} about {topic}", at - 20.0 - (k % 3) * 10.0)
        )
        if k % 4 == 0:
            own.append(OwnMessage(CH, at + 10.0, "x" * 40, at - 20.0 - (k % 3) * 10.0))
    return build_habits(member, [name], own)


def test_habits_read_the_members_own_delays_bursts_and_typing() -> None:
    h = _habits("1", "Alice", "gardening")
    assert sorted(set(h.delays)) == [20.0, 30.0, 40.0]
    assert sorted(set(h.bursts)) == [1, 2] and h.bursts.count(2) == 15
    assert h.cps == 4.0
    rng = random.Random(3)
    draws = [sample_delay(h, rng, cap_s=35.0) for _ in range(200)]
    assert all(20.0 <= d <= 35.0 for d in draws) and 22.0 < sum(draws) / len(draws) < 30.0
    assert {sample_burst(h, rng, cap=3) for _ in range(200)} == {1, 2}
    assert typing_s(h, 20, cap_s=3.0) == 3.0 and typing_s(h, 8, cap_s=3.0) == 2.0


def test_addressed_member_is_chosen_and_only_one() -> None:
    alice, bob = _habits("1", "Alice", "gardening"), _habits("2", "Bob", "gardening")
    members = [alice, bob]
    corpus = word_corpus(members)
    memory = ChannelMemory()
    memory.note("1", T0 - 900.0, human=True)  # both were here a quarter of an hour ago
    memory.note("2", T0 - 900.0, human=True)
    moment = Moment(CH, T0, "9", "alice, what about the gardening this weekend?")
    pick = choose(members, moment, memory, "quiet", quiet_s=300.0, corpus=corpus)
    assert pick is not None and pick.member_id == "1" and pick.named
    replied = Moment(CH, T0, "9", "what about it then?", reply_to_author="1")
    assert choose(members, replied, memory, "quiet", quiet_s=300.0, corpus=corpus).member_id == "1"  # type: ignore[union-attr]
    unnamed = Moment(CH, T0, "9", "what about the roses?")
    assert probability(alice, unnamed, memory, corpus)[0] < probability(alice, moment, memory, corpus)[0]
    assert choose(members, unnamed, memory, "quiet", quiet_s=300.0, corpus=corpus) is None
    passing = Moment(CH, T0, "9", "what would alice say about the roses?")
    p_passing = probability(alice, passing, memory, corpus)[0]
    assert (
        probability(alice, unnamed, memory, corpus)[0]
        < p_passing
        < probability(alice, moment, memory, corpus)[0]
    )


def test_the_gate_asks_as_if_the_member_were_here() -> None:
    """Where the member was, or how long ago, does not move the probability: only the rules use it."""
    alice = _habits("1", "Alice", "gardening")
    corpus = word_corpus([alice])
    moment = Moment(CH, T0, "9", "alice, what about the gardening this weekend?")
    away, around = ChannelMemory(), ChannelMemory()
    around.note("1", T0 - 400.0, human=True)
    assert probability(alice, moment, away, corpus) == probability(alice, moment, around, corpus)


def test_naming_and_topic_work_with_few_members() -> None:
    alice = _habits("1", "Alice", "gardening")
    # Bob once wrote "alice" (on a small server the old rule made her name "common" from that alone).
    own = [OwnMessage(CH, T0 - 5000.0 + k, f"engines and carburettors {k}", None) for k in range(40)]
    own.append(OwnMessage(CH, T0 - 100.0, "ask alice about that", None))
    bob = build_habits("2", ["Bob"], own)
    small = word_corpus([alice, bob])
    memory = ChannelMemory()
    passing = Moment(CH, T0, "9", "what would alice say about that?")
    assert probability(alice, passing, memory, small)[1], "named, though another member once wrote her name"
    alone = word_corpus([alice])
    assert topic_overlap(alice, "any gardening plans?", alone) > 0.1, "topic works with one candidate"
    assert topic_overlap(alice, "any engine plans?", alone) == 0.0
    # A name many messages use as a word ("ubuntu" in #ubuntu) counts only when it opens the message.
    ubuntu = build_habits(
        "3", ["ubuntu"], [OwnMessage(CH, T0 - 9000.0 + k, f"ubuntu {k}", None) for k in range(40)]
    )
    busy = word_corpus([alice, bob, ubuntu])
    assert busy.common("ubuntu") and not busy.common("alice")
    assert not probability(ubuntu, Moment(CH, T0, "9", "is ubuntu any good?"), memory, busy)[1]
    assert probability(ubuntu, Moment(CH, T0, "9", "ubuntu: is it good?"), memory, busy)[1]


def test_never_while_the_member_is_here_nor_when_pinged_nor_for_the_author() -> None:
    alice = _habits("1", "Alice", "gardening")
    corpus = word_corpus([alice])
    memory = ChannelMemory()
    memory.note("1", T0 - 60.0, human=True)
    moment = Moment(CH, T0, "9", "alice: roses?")
    assert choose([alice], moment, memory, "lively", quiet_s=300.0, corpus=corpus) is None, (
        "she wrote a minute ago"
    )
    memory = ChannelMemory()
    memory.note("1", T0 - 900.0, human=True)
    assert choose([alice], moment, memory, "lively", quiet_s=300.0, corpus=corpus) is not None
    pinged = Moment(CH, T0, "9", "alice: roses?", pinged=frozenset({"1"}))
    assert choose([alice], pinged, memory, "lively", quiet_s=300.0, corpus=corpus) is None, (
        "her person was called"
    )
    own = Moment(CH, T0, "1", "alice: roses?")
    assert choose([alice], own, memory, "lively", quiet_s=300.0, corpus=corpus) is None


def test_persona_messages_never_count_as_the_member_nor_move_the_conversation() -> None:
    memory = ChannelMemory()
    memory.note("9", T0, human=True)
    memory.note("1", T0 + 1, human=False)  # Alice's persona spoke: not Alice
    assert memory.seen == {"9": T0} and memory.humans == 1 and not memory.last_human
