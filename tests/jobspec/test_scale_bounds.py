"""What grows with the community stays bounded: the attribution panel, and job-folder datasets are sealed."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

import pytest

from core.chatformat import ChatFormat
from core.settings import Settings
from data.crypto import job_key, job_key_for
from data.records import Member, Message
from jobs.dataset import build_dataset, materialize
from jobspec.attribution import PANEL_OTHERS, PANEL_PER_AUTHOR, attribution_report, choose_panel, panel_rows
from jobspec.errors import JobConfigError
from jobspec.jobdata import is_sealed, load_job_data, open_bytes, read_jsonl, read_key

FMT = ChatFormat(
    template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    eos_token="<|im_end|>",
)
ME = "1000"
WORDS = "raid patch pizza cat rust exams coffee movie playlist keyboard weekend server".split()


def _community(n_members: int, per_member: int, seed: int = 0) -> list[Message]:
    """One channel where `n_members` members (activity falling with their index) take turns; ME talks most."""
    rng = random.Random(seed)
    msgs: list[Message] = []
    t = 0.0
    authors = [ME] + [str(2000 + i) for i in range(n_members - 1)]
    weights = [3.0] + [1.0 / (1 + i) for i in range(n_members - 1)]
    for k in range(n_members * per_member):
        author = rng.choices(authors, weights)[0]
        t += 30
        text = f"{author[-2:]} says {' '.join(rng.sample(WORDS, 3))} number {k}"
        msgs.append(Message(str(10_000 + k), "g", "c1", "general", author, f"m{author}", t, text))
    return msgs


def test_panel_is_the_member_and_the_most_active_others() -> None:
    counts = {ME: 5, **{str(i): 100 - i for i in range(40)}, "quiet": 2}
    panel = choose_panel(counts, ME)
    assert panel[0] == ME and len(panel) == PANEL_OTHERS + 1
    assert panel[1:] == [str(i) for i in range(PANEL_OTHERS)]  # the most active, ties by id
    assert "quiet" not in choose_panel(counts, ME, others=100)  # too few messages to be classified
    assert len(choose_panel(counts, None)) == PANEL_OTHERS + 1  # multi-persona: the most active overall


def test_attribution_panel_and_chance_do_not_grow_with_the_community() -> None:
    rng = random.Random(3)
    rows = [
        {"author_id": str(a), "text": f"{'!' * (a % 5)} {rng.choice(WORDS)} {a} {'x' * (a % 7)}"}
        for a in range(300)
        for _ in range(30)
    ]
    rows += [{"author_id": ME, "text": f"omg {rng.choice(WORDS)} lol 😭"} for _ in range(400)]
    kept = panel_rows(rows, ME, seed=1)
    authors = {r["author_id"] for r in kept}
    assert len(authors) == PANEL_OTHERS + 1 and ME in authors
    assert sum(r["author_id"] == ME for r in kept) == PANEL_PER_AUTHOR  # capped per member
    report = attribution_report(rows, {"adapter": [f"omg {w} lol 😭" for w in WORDS]}, ME, seed=1)
    assert report["available"] and report["panel"] == report["members"] == PANEL_OTHERS + 1
    assert report["chance"] == pytest.approx(1 / (PANEL_OTHERS + 1), abs=1e-3)
    assert report["share"]["adapter"] > 0.5 and "most active" in report["panel_rule"]


def test_job_folder_holds_only_the_panel(settings: Settings) -> None:
    s = replace(settings, training=replace(settings.training, min_examples=5))
    msgs = _community(60, 12)
    ds = build_dataset(msgs, ME, s, FMT)
    authors = {r["author_id"] for r in ds.attribution}
    assert ME in authors and len(authors) == PANEL_OTHERS + 1
    meta = ds.meta(s.dataset)
    assert meta["counts"]["attribution_panel"] == PANEL_OTHERS + 1
    # The erasure cascade finds the folder through everyone whose words are in it: the panel and the context.
    assert authors <= set(meta["contains"])


def test_dataset_files_are_unreadable_without_the_job_key(settings: Settings, tmp_path: Path) -> None:
    s = replace(settings, training=replace(settings.training, min_examples=5))
    msgs = _community(30, 8)
    job = s.jobs_dir / "job-abc"

    async def scenario() -> dict:
        from data.store import Store

        async with Store.open(s) as store:
            async with store.write() as db:
                for a in sorted({m.author_id for m in msgs}):
                    await db.execute(
                        "INSERT INTO consent(member_id, scope, granted_at, actor, channel) "
                        "VALUES (?, 'train', 0, 'test', 'cli')",
                        (a,),
                    )
            for a in sorted({m.author_id for m in msgs}):
                await store.members.upsert(Member(a, f"m{a}", f"M{a}"))
            await store.messages.add_many(msgs)
            return await materialize(store, s, ME, job, FMT)

    meta = asyncio.run(scenario())
    files = sorted((job / "dataset").glob("*.jsonl"))
    assert {p.name for p in files} >= {"train.jsonl", "heldout.jsonl", "attribution.jsonl"}
    some_text = msgs[-1].content.split(" number ")[0]
    for path in files:
        raw = path.read_bytes()
        assert is_sealed(path) and b"says" not in raw and some_text.encode() not in raw
    # The child cannot read them without the key; a wrong key (another job's) fails with one line.
    with pytest.raises(JobConfigError, match="encrypted and no job key"):
        load_job_data(job)
    with pytest.raises(JobConfigError, match="does not open"):
        load_job_data(job, job_key(b"\0" * 32, job.name))
    with pytest.raises(JobConfigError, match="does not open"):
        load_job_data(job, job_key_for(s, s.jobs_dir / "another-job"))
    key = job_key_for(s, job)
    data = load_job_data(job, key)
    assert (
        len(data.train) == meta["counts"]["train"] and len({r["author_id"] for r in data.attribution}) <= 17
    )
    # A file swapped for another job file does not open either (its name is bound into the seal).
    (job / "dataset" / "val.jsonl").write_bytes((job / "dataset" / "heldout.jsonl").read_bytes())
    with pytest.raises(JobConfigError, match="does not open"):
        read_jsonl(job / "dataset" / "val.jsonl", key=key)
    # meta.json holds ids and counts only, no message text.
    assert "says" not in (job / "dataset" / "meta.json").read_text()
    assert b"says" in open_bytes(job / "dataset" / "train.jsonl", key)


def test_the_key_comes_from_a_pipe_line_or_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    key = bytes(range(32))
    assert read_key(io.BytesIO(key.hex().encode() + b"\n")) == key
    monkeypatch.delenv("DOPPEL_JOB_KEY", raising=False)
    assert read_key(io.BytesIO(b"")) is None
    with pytest.raises(JobConfigError, match="32 bytes"):
        read_key(io.BytesIO(b"abcd\n"))
