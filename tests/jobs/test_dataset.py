"""Building persona examples from handmade message lists, and writing them into a job folder."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from core.chatformat import ChatFormat
from core.settings import Settings
from data.crypto import job_key_for
from data.records import Message
from jobs.dataset import (
    Example,
    build_dataset,
    build_examples,
    build_turns,
    cap_share,
    materialize,
    split_by_time,
    weight_by_reactions,
    write_dataset,
)
from jobs.errors import DatasetError, NotEnoughExamplesError
from jobs.preference import preference_rows
from jobspec.cleaning import Cleaner
from jobspec.jobdata import is_sealed, open_bytes

# SmolLM2-135M-Instruct's template, copied once from the bundled GGUF (reading the GGUF takes seconds).
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FMT = ChatFormat(template=SMOL_TEMPLATE, eos_token="<|im_end|>")
ME, BOB, CAT = "100", "200", "300"
NAMES = {ME: "alice", BOB: "bob", CAT: "cat"}


class Chat:
    """Builds a channel's messages with increasing ids and explicit times."""

    def __init__(self, channel: str = "c1", name: str = "general") -> None:
        self.channel, self.name, self.msgs, self.next_id = channel, name, [], 1000

    def say(self, author: str, t: float, text: str, **kw: object) -> str:
        self.next_id += 1
        mid = f"{self.channel}{self.next_id}" if not self.channel.isdigit() else str(self.next_id)
        self.msgs.append(
            Message(mid, "g1", self.channel, self.name, author, NAMES.get(author, author), t, text, **kw)  # type: ignore[arg-type]
        )
        return mid


def _tuned(settings: Settings, **dataset: object) -> Settings:
    training = replace(settings.training, min_examples=int(dataset.pop("min_examples", 1)))  # type: ignore[call-overload]
    return replace(settings, dataset=replace(settings.dataset, **dataset), training=training)


def _examples(settings: Settings, msgs: list[Message], member: str = ME, **kw: object) -> list[Example]:
    cleaner = Cleaner(NAMES, settings.dataset.min_chars, settings.dataset.max_chars)
    turns = build_turns(msgs, cleaner, settings.dataset.merge_gap_s)
    return build_examples(turns, member, NAMES[member], settings.dataset, FMT, cleaner, **kw)  # type: ignore[arg-type]


def _conversation(n: int, start: float = 0.0, channel: str = "c1", gap: float = 60.0) -> Chat:
    chat = Chat(channel)
    t = start
    for i in range(n):
        chat.say(BOB, t, f"bob asks question number {i}?")
        chat.say(ME, t + 10, f"alice answers {i} with her usual flair!!")
        t += gap * 10
    return chat


def test_consecutive_messages_merge_within_gap_only(settings: Settings) -> None:
    s = _tuned(settings, merge_gap_s=120)
    chat = Chat()
    chat.say(BOB, 0, "so what happened")
    chat.say(ME, 10, "ok so")
    chat.say(ME, 40, "first i went out")
    chat.say(ME, 150, "then it rained")  # 110 s after the previous one: still the same thought
    chat.say(ME, 600, "anyway")  # too late: a new turn
    examples = _examples(s, chat.msgs)
    assert [ex.target for ex in examples] == ["ok so\nfirst i went out\nthen it rained", "anyway"]
    # The second turn sees the first as the persona's own earlier (assistant) turn.
    roles = [m["role"] for m in examples[1].messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert examples[1].messages[2]["content"] == examples[0].target


def test_context_is_capped_by_count_and_time_window(settings: Settings) -> None:
    s = _tuned(settings, context_messages=3, context_window_s=600)
    chat = Chat()
    chat.say(CAT, 0, "ancient history message")
    for i in range(6):
        chat.say(BOB if i % 2 else CAT, 1000 + i * 10, f"line {i}")
    chat.say(ME, 1100, "my reply")
    (ex,) = _examples(s, chat.msgs)
    assert "line 5" in ex.prompt and "line 3" in ex.prompt
    assert "line 2" not in ex.prompt  # over the count cap
    assert "ancient" not in ex.prompt
    s2 = _tuned(settings, context_messages=20, context_window_s=600)
    (ex2,) = _examples(s2, chat.msgs)
    assert "line 0" in ex2.prompt and "ancient" not in ex2.prompt  # 1100 s old: outside the window


def test_rendering_uses_the_chat_format_and_ends_with_end_of_turn(settings: Settings) -> None:
    chat = Chat(name="memes")
    chat.say(BOB, 0, "hello <@100>")
    chat.say(ME, 5, "hi bob, mail me at me@example.com")
    (ex,) = _examples(settings, chat.msgs)
    assert ex.prompt.endswith("<|im_start|>assistant\n")
    assert ex.completion == "hi bob, mail me at [email]<|im_end|>"
    # The default style: a short nameless system prompt, the others' lines without their names.
    assert "\nhello @alice" in ex.prompt and "bob:" not in ex.prompt and "You are alice" not in ex.prompt
    (named,) = _examples(settings, chat.msgs, style="persona")
    assert (
        "bob: hello @alice" in named.prompt and "#memes" in named.prompt and "You are alice" in named.prompt
    )
    assert named.completion == ex.completion
    full = FMT.render(
        [*ex.messages, {"role": "assistant", "content": ex.target}], add_generation_prompt=False
    )
    assert full.startswith(ex.prompt + ex.completion)
    assert "example.com" not in ex.prompt + ex.completion


def test_lineage_records_context_authors_and_only_allowed_authors_appear(settings: Settings) -> None:
    s = _tuned(settings, heldout_fraction=0.0, validation_fraction=0.0, context_window_s=600)
    chat = Chat()
    chat.say(BOB, 0, "bob speaks")
    chat.say("666", 5, "SECRET WORDS OF A NON MEMBER")
    chat.say(ME, 10, "alice replies")
    chat.say(CAT, 1000, "cat speaks alone")
    chat.say(ME, 1010, "alice again")
    ds = build_dataset(chat.msgs, ME, s, FMT, names=NAMES, allowed={ME, BOB, CAT})
    rows = [ex.row() for ex in ds.train]
    assert sorted(tuple(r["members"]) for r in rows) == [(ME, BOB), (ME, CAT)]
    assert ds.lineage == [ME, BOB, CAT]
    dumped = json.dumps([rows, ds.attribution])
    assert "NON MEMBER" not in dumped and "666" not in dumped
    assert ds.dropped["not_allowed"] == 1


def test_unusable_turns_and_copy_pastes_are_dropped(settings: Settings) -> None:
    chat = Chat()
    t = 0.0
    for i in range(4):
        chat.say(BOB, t, f"topic {i}")
        chat.say(ME, t + 5, "lol")  # short, different contexts: style, kept
        chat.say(BOB, t + 300, f"more {i}")
        chat.say(
            ME,
            t + 305,
            "BUY CHEAP GOLD AT OUR SHOP TODAY!!!" if i % 2 else "buy cheap gold at our shop today",
        )
        chat.say(BOB, t + 600, "pic")
        chat.say(ME, t + 605, "", attachments=1)
        chat.say(BOB, t + 900, "link?")
        chat.say(ME, t + 905, "https://example.com/page")
        t += 5000
    examples = _examples(settings, chat.msgs)
    targets = [ex.target for ex in examples]
    assert targets.count("lol") == 4
    assert sum("gold" in x.lower() for x in targets) == 1
    assert not any("example.com" in x for x in targets)
    assert len(examples) == 5


def test_split_is_by_time_per_member_and_reproducible(settings: Settings) -> None:
    s = _tuned(settings, heldout_fraction=0.1, validation_fraction=0.1, seed=7)
    chat = _conversation(50)
    examples = _examples(s, chat.msgs)
    assert len(examples) == 50
    train, val, held = split_by_time(examples, 0.1, 0.1, seed=7)
    assert (len(train), len(val), len(held)) == (41, 4, 5)  # 10% of the 45 earlier ones, rounded
    assert min(ex.ts for ex in held) > max(ex.ts for ex in train + val)
    again = split_by_time(list(reversed(examples)), 0.1, 0.1, seed=7)
    assert [ex.ts for ex in again[0]] == [ex.ts for ex in train]
    assert [ex.ts for ex in again[1]] == [ex.ts for ex in val]
    other = split_by_time(examples, 0.1, 0.1, seed=8)
    assert {ex.ts for ex in other[1]} != {ex.ts for ex in val}
    assert {ex.ts for ex in other[2]} == {ex.ts for ex in held}


def test_shots_show_other_training_replies_as_own_turns_and_never_a_heldout_one(settings: Settings) -> None:
    from core.chatformat import EXAMPLE_CUE

    s = _tuned(settings, heldout_fraction=0.1, validation_fraction=0.1, seed=7)
    msgs = _conversation(50).msgs
    plain = build_dataset(msgs, ME, s, FMT, names=NAMES)
    shot = build_dataset(msgs, ME, s, FMT, names=NAMES, shots=3)
    train_targets = {ex.target for ex in plain.train}
    held_targets = {ex.target for ex in plain.heldout}
    assert [ex.prompt for ex in shot.heldout] == [
        ex.prompt for ex in plain.heldout
    ]  # perplexity stays comparable
    for ex in [*shot.train, *shot.val]:
        # system, then (cue, own reply) x 3, then the conversation as before
        assert [m["content"] for m in ex.messages[1:7:2]] == [EXAMPLE_CUE] * 3
        shown = [m["content"] for m in ex.messages[2:8:2]]
        assert all(m["role"] == "assistant" for m in ex.messages[2:8:2])
        assert len(set(shown)) == 3 and ex.target not in shown
        assert set(shown) <= train_targets and not set(shown) & held_targets
        assert all(line in ex.prompt for line in shown) and ex.completion.startswith(ex.target)
    # Same examples and order, only the prompts grew; seeded, so a rebuild is identical.
    assert [ex.target for ex in shot.train] == [ex.target for ex in plain.train]
    again = build_dataset(msgs, ME, s, FMT, names=NAMES, shots=3)
    assert [ex.prompt for ex in again.train] == [ex.prompt for ex in shot.train]


def test_multi_persona_cap_limits_any_members_share() -> None:
    def fake(member: str, i: int) -> Example:
        return Example(member, "c", (), "t", "p", "c", (member,), float(i))

    examples = [fake("big", i) for i in range(300)]
    for m in range(9):
        examples += [fake(f"m{m}", i) for i in range(20 + m)]
    capped = cap_share(examples, 0.12, seed=1)
    counts: dict[str, int] = {}
    for ex in capped:
        counts[ex.member_id] = counts.get(ex.member_id, 0) + 1
    assert max(counts.values()) / len(capped) <= 0.12 + 1e-9
    assert counts["m0"] == 20  # small members keep everything
    assert counts["big"] < 40
    assert cap_share(examples, 0.12, seed=1) == capped
    # With three members no cap under one third is satisfiable: shares settle at a third each.
    three = [fake(m, i) for m, n in (("a", 50), ("b", 10), ("c", 10)) for i in range(n)]
    assert sum(ex.member_id == "a" for ex in cap_share(three, 0.12, seed=1)) == 10


def test_multi_mode_builds_every_members_examples_with_respond_as(settings: Settings) -> None:
    s = _tuned(settings, heldout_fraction=0.1, validation_fraction=0.0, multi_persona_cap=0.12)
    chat = _conversation(30)
    ds = build_dataset(chat.msgs, "", s, FMT, names=NAMES, multi=True, reaction_weighting=True)
    members = {ex.member_id for ex in ds.train}
    assert members == {ME, BOB}
    assert all("Respond as" in ex.messages[0]["content"] for ex in ds.train)
    meta = ds.meta(s.dataset)
    assert meta["member"] is None and meta["multi"] is True
    assert meta["counts"]["train_per_member"][ME] == meta["counts"]["train_per_member"][BOB]


def test_reaction_weights_scale_between_one_and_one_and_a_half(settings: Settings) -> None:
    chat = Chat()
    for i, n in enumerate([0, 1, 3, 10]):
        chat.say(BOB, i * 1000, f"q{i}")
        chat.say(ME, i * 1000 + 5, f"answer {i}", reactions={"😂": n} if n else {})
    weighted = weight_by_reactions(_examples(settings, chat.msgs))
    weights = [ex.weight for ex in sorted(weighted, key=lambda e: e.reactions)]
    assert weights[0] == 1.0 and weights[-1] == 1.5
    assert weights == sorted(weights) and len(set(weights)) == 4


def test_preference_rows_from_reactions_pairs_and_feedback(settings: Settings) -> None:
    chat = Chat()
    q = chat.say(BOB, 0, "what should we eat")
    chat.say(ME, 5, "pizza obviously", reactions={"👍": 4}, reply_to=q)
    chat.say(CAT, 200, "sushi?")
    chat.say(ME, 400, "salad i guess", reply_to=q)
    chat.say(BOB, 5000, "unrelated")
    chat.say(ME, 5005, "whatever")
    examples = _examples(settings, chat.msgs)
    feedback = [{"prompt": "P", "completion": "bad reply<|im_end|>", "value": -1, "members": [ME]}]
    rows = preference_rows(examples, feedback)
    kto = [r for r in rows if r["kind"] == "kto"]
    dpo = [r for r in rows if r["kind"] == "dpo"]
    assert len(dpo) == 1
    assert dpo[0]["chosen"] == "pizza obviously<|im_end|>" and dpo[0]["rejected"] == "salad i guess<|im_end|>"
    assert dpo[0]["prompt"] == examples[0].prompt  # both answer the same message: the earliest prompt
    labels = {(r["completion"], r["label"], r["source"]) for r in kto}
    assert ("pizza obviously<|im_end|>", True, "reactions") in labels
    assert ("salad i guess<|im_end|>", False, "unreacted") in labels
    assert ("bad reply<|im_end|>", False, "feedback") in labels
    assert not any(r["completion"] == "whatever<|im_end|>" for r in kto)


def test_too_few_examples_and_bad_mode_are_clear_errors(settings: Settings) -> None:
    s = _tuned(settings, min_examples=20)
    with pytest.raises(NotEnoughExamplesError, match="at least 20"):
        build_dataset(_conversation(5).msgs, ME, s, FMT, names=NAMES)
    with pytest.raises(DatasetError, match="unknown training mode"):
        build_dataset(_conversation(30).msgs, ME, s, FMT, names=NAMES, mode="rlhf")


def test_write_dataset_is_atomic_and_complete(settings: Settings, tmp_path: Path) -> None:
    s = _tuned(settings, min_examples=20)
    msgs = _conversation(40).msgs + _conversation(10, start=10**6, channel="c2").msgs
    ds = build_dataset(msgs, ME, s, FMT, names=NAMES, mode="sft+kto")
    job = tmp_path / "job"
    meta = write_dataset(ds, job, s.dataset)
    folder = job / "dataset"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["train.jsonl", "val.jsonl", "heldout.jsonl", "preference.jsonl", "attribution.jsonl", "meta.json"]
    )
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(train) == meta["counts"]["train"] > 0
    assert set(train[0]) >= {"prompt", "completion", "target", "messages", "members", "weight", "ts"}
    assert all(r["completion"].endswith("<|im_end|>") for r in train)
    assert json.loads((folder / "meta.json").read_text())["lineage"] == [ME, BOB]
    assert meta["window"]["heldout_from"] >= max(r["ts"] for r in train)
    attribution = [json.loads(line) for line in (folder / "attribution.jsonl").read_text().splitlines()]
    held_ts = {json.loads(line)["ts"] for line in (folder / "heldout.jsonl").read_text().splitlines()}
    assert {r["author_id"] for r in attribution} == {ME, BOB}
    assert not any(r["author_id"] == ME and r["ts"] in held_ts for r in attribution)

    # A failure half way leaves the previous dataset untouched and no temporary folder behind.
    ds.preference.append({"kind": "kto", "bad": object()})
    with pytest.raises(TypeError):
        write_dataset(ds, job, s.dataset)
    assert sorted(p.name for p in job.iterdir()) == ["dataset"]
    assert json.loads((folder / "meta.json").read_text()) == meta


async def _seeded_store(settings: Settings, consenting: set[str]):  # type: ignore[no-untyped-def]
    from data.records import Member
    from data.store import Store

    store = await Store.open(settings)
    async with store.write() as db:
        for member in consenting:
            await db.execute(
                "INSERT INTO consent(member_id, scope, granted_at, actor, channel) VALUES (?, 'train', 0, 'test', 'cli')",
                (member,),
            )
    for mid, name in NAMES.items():
        await store.members.upsert(Member(mid, name, name.title()))
    return store


def test_materialize_reads_only_consenting_members_from_the_store(settings: Settings, tmp_path: Path) -> None:
    asyncio.run(_materialize_scenario(_tuned(settings, min_examples=20), tmp_path))


async def _materialize_scenario(s: Settings, tmp_path: Path) -> None:
    store = await _seeded_store(s, {ME, BOB})
    try:
        chat = _conversation(30)
        t = 30 * 600
        chat.say(CAT, t, "cat was never asked")  # no consent: the store drops it
        chat.say(ME, t + 5, "cat is quiet today", reactions={"🐱": 2})
        assert await store.messages.add_many(chat.msgs) == 61
        await store.feedback.add(ME, BOB, 1, prompt="bob: secret context of a chat", reply="great answer")
        meta = await materialize(store, s, ME, tmp_path / "job", FMT, mode="sft+kto", style="plain+names")
        assert meta["lineage"] == [ME, BOB] and meta["member"] == ME
        assert meta["counts"]["train"] + meta["counts"]["val"] + meta["counts"]["heldout"] == 31
        key = job_key_for(s, tmp_path / "job")
        files = sorted((tmp_path / "job" / "dataset").glob("*.jsonl"))
        assert files and all(is_sealed(p) for p in files)  # encrypted at rest, opened with the job's key
        text = "".join(open_bytes(p, key).decode() for p in files)
        # Display names from the members table: "Bob: ..." in every prompt of a style that names the others.
        assert "never asked" not in text and "Bob: bob asks" in text
        pref_text = open_bytes(tmp_path / "job" / "dataset" / "preference.jsonl", key).decode()
        pref = [json.loads(x) for x in pref_text.splitlines()]
        assert any(r["source"] == "feedback" and r["completion"] == "great answer<|im_end|>" for r in pref)
        assert "secret context" not in text

        # Revoking consent stops training at once, even before the erasure cascade has run.
        async with store.write() as db:
            await db.execute("DELETE FROM consent WHERE member_id = ?", (ME,))
        with pytest.raises(DatasetError, match="not consented"):
            await materialize(store, s, ME, tmp_path / "job2", FMT)
        assert not (tmp_path / "job2" / "dataset").exists()
        # Multi-persona mode covers every consenting member (now only bob).
        meta = await materialize(store, s, "", tmp_path / "job3", FMT, multi=True)
        assert meta["lineage"] == [BOB] and meta["multi"]
    finally:
        await store.close()


def test_dataset_benchmark_reports_throughput_and_padding(settings: Settings, tmp_path: Path) -> None:
    from doppel.benchtrain import _dataset_bench

    s = replace(settings, home=tmp_path / "bench")
    result = asyncio.run(_dataset_bench(s, n_messages=300, n_members=3))
    assert result["messages"] == 300
    for run in ("single", "multi"):
        assert result[run]["examples"] > 20 and result[run]["examples_per_s"] > 0
    assert result["multi"]["examples"] > result["single"]["examples"]
    tokens = result["single"].get("tokens")
    if tokens:  # only with the bundled base model's tokenizer
        assert tokens["padding_fraction_length_grouped"] < tokens["padding_fraction_random_batches"]


def test_a_discord_reply_brings_the_message_it_answers_into_context(settings: Settings) -> None:
    s = _tuned(settings, context_messages=2, context_window_s=600)
    chat = Chat()
    q = chat.say(BOB, 0, "who wants pizza tomorrow")
    for i in range(4):
        chat.say(CAT if i % 2 else BOB, 5000 + i, f"chatter {i}")
    chat.say(ME, 5010, "me!! pizza", reply_to=q)
    chat.say(ME, 9000, "later thought", reply_to="unknown-id")
    first, second = _examples(s, chat.msgs)
    assert "who wants pizza" in first.prompt and "chatter 3" in first.prompt
    assert "chatter 2" not in first.prompt  # the reply target took the oldest slot: still two turns
    assert first.members == (ME, BOB, CAT)
    assert "who wants pizza" not in second.prompt
