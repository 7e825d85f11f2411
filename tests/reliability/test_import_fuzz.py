"""Fuzzer over the DiscordChatExporter importer: mutated exports end in a clean import or one clear error.

Seeds: the real DCE captures (bot-only) and the hand-made exports (human authors), both in tests/fixtures/dce.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.errors import UserFacingError
from core.settings import Settings
from tests.helpers.dce_fixtures import DELETED_USER, FIXTURES, MAREN, ROS, TEO

CONSENTING = (MAREN, TEO, ROS, DELETED_USER)
SEED = int(os.environ.get("DOPPEL_FUZZ_SEED", "20240607"))
CASES = int(os.environ.get("DOPPEL_FUZZ_CASES", "300"))

pytestmark = pytest.mark.timeout(240)


# -- mutations --------------------------------------------------------------------------------------------------
def _flip(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _delete_span(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data))
    return data[:a] + data[a + rng.randint(1, 200) :]


def _duplicate_span(rng: random.Random, data: bytes) -> bytes:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 400))
    return data[:b] + data[a:b] + data[b:]


def _bom(rng: random.Random, data: bytes) -> bytes:
    return rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]) + data


def _invalid_utf8(rng: random.Random, data: bytes) -> bytes:
    # Inside a string value, where a parser that only checks structure would let it through.
    spots = [i for i in range(len(data)) if data[i : i + 1] == b'"']
    at = rng.choice(spots) + 1 if spots else 0
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80\x80"])
    return data[:at] + junk + data[at:]


def _utf16(rng: random.Random, data: bytes) -> bytes:
    return data.decode("utf-8").encode(rng.choice(["utf-16", "utf-32"]))


BYTE_MUTATIONS: list[Callable[[random.Random, bytes], bytes]] = [
    _flip,
    _truncate,
    _delete_span,
    _duplicate_span,
    _bom,
    _invalid_utf8,
    _utf16,
]

WEIRD_VALUES: list[Any] = [
    None,
    0,
    -1,
    2**70,
    1e308,
    -1e308,
    3.5,
    True,
    False,
    "",
    " ",
    "\u0000",
    "x" * 5000,
    [],
    {},
    [1, 2],
    {"id": "1"},
    "９９９",
    "1e5",
    "NaN",
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]


def _messages(doc: dict[str, Any]) -> list[Any]:
    msgs = doc.get("messages")
    return msgs if isinstance(msgs, list) and msgs else []


def _set_field(rng: random.Random, doc: dict[str, Any]) -> None:
    """Replace one field of one message (or of its author/reference/reactions) by a value of another type."""
    msgs = _messages(doc)
    if not msgs:
        return
    m = rng.choice(msgs)
    if not isinstance(m, dict):
        return
    target: dict[str, Any] = m
    pick = rng.random()
    if pick < 0.35 and isinstance(m.get("author"), dict):
        target = m["author"]
    elif pick < 0.45 and isinstance(m.get("reference"), dict):
        target = m["reference"]
    elif (
        pick < 0.55
        and isinstance(m.get("reactions"), list)
        and m["reactions"]
        and isinstance(m["reactions"][0], dict)
    ):
        target = m["reactions"][0]
    key = rng.choice(list(target) or ["id"])
    if rng.random() < 0.2:
        target.pop(key, None)
    else:
        target[key] = copy.deepcopy(rng.choice(WEIRD_VALUES))


def _ids_as_numbers(rng: random.Random, doc: dict[str, Any]) -> None:
    for m in _messages(doc):
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"].isdigit():
            m["id"] = int(m["id"])
        author = m.get("author") if isinstance(m, dict) else None
        if isinstance(author, dict) and isinstance(author.get("id"), str) and rng.random() < 0.5:
            author["id"] = int(author["id"]) if author["id"].isdigit() else author["id"]


def _null_author(rng: random.Random, doc: dict[str, Any]) -> None:
    msgs = [m for m in _messages(doc) if isinstance(m, dict)]
    if msgs:
        rng.choice(msgs)["author"] = rng.choice([None, "someone", [], {"name": "no id"}, {"id": None}])


def _drop_content(rng: random.Random, doc: dict[str, Any]) -> None:
    for m in _messages(doc):
        if isinstance(m, dict) and rng.random() < 0.5:
            m.pop("content", None)


def _wrong_nesting(rng: random.Random, doc: dict[str, Any]) -> None:
    choice = rng.randrange(6)
    if choice == 0:
        doc["messages"] = {"0": doc.get("messages")}
    elif choice == 1:
        doc["messages"] = [doc.get("messages")]
    elif choice == 2:
        doc["channel"] = [doc.get("channel")]
    elif choice == 3:
        doc["guild"] = rng.choice([None, "g", 5, []])
    elif choice == 4:
        msgs = _messages(doc)
        if msgs:
            msgs[rng.randrange(len(msgs))] = rng.choice([None, 1, "m", [msgs[0]]])
    else:
        doc.pop(rng.choice(["messages", "channel", "guild"]), None)


def _huge_numbers(rng: random.Random, doc: dict[str, Any]) -> None:
    for m in _messages(doc):
        if not isinstance(m, dict):
            continue
        if rng.random() < 0.3:
            m["timestamp"] = rng.choice(
                ["9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-12:00", 1e300, 10**30]
            )
        reactions = m.get("reactions")
        for r in reactions if isinstance(reactions, list) else []:
            if isinstance(r, dict):
                r["count"] = rng.choice([10**40, -5, 1e308, "3", None])


def _channel_type(rng: random.Random, doc: dict[str, Any]) -> None:
    channel = doc.get("channel")
    if isinstance(channel, dict):
        channel[rng.choice(["id", "name"])] = copy.deepcopy(rng.choice(WEIRD_VALUES))


STRUCT_MUTATIONS: list[Callable[[random.Random, dict[str, Any]], None]] = [
    _set_field,
    _set_field,
    _set_field,
    _ids_as_numbers,
    _null_author,
    _drop_content,
    _wrong_nesting,
    _huge_numbers,
    _channel_type,
]


def mutate(rng: random.Random, original: bytes) -> bytes:
    """One mutated export: structural edits (re-serialised), byte edits, or both."""
    out = original
    if rng.random() < 0.6:
        doc = json.loads(original)
        for _ in range(rng.randint(1, 3)):
            rng.choice(STRUCT_MUTATIONS)(rng, doc)
        out = json.dumps(doc, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode(
            "utf-8", "surrogatepass"
        )
    if out is original or rng.random() < 0.3:
        out = rng.choice(BYTE_MUTATIONS)(rng, out)
    return out


# -- harness ----------------------------------------------------------------------------------------------------
def _fixtures() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(FIXTURES.rglob("*.json"))]
    assert len(seeds) == 13  # 6 real captures + 7 hand-made exports
    return seeds


async def _snapshot(store: Any) -> tuple[Any, ...]:
    """Everything an import may write: messages (with their sealed content), members, member keys."""
    msgs = await store.fetchall(
        "SELECT id, author_id, channel_id, content, edited_at FROM messages ORDER BY id"
    )
    members = await store.fetchall("SELECT id, name, display_name FROM members ORDER BY id")
    keys = await store.fetchall("SELECT member_id FROM member_keys ORDER BY member_id")
    return tuple(map(tuple, msgs)), tuple(map(tuple, members)), tuple(map(tuple, keys))


def test_mutated_exports_import_cleanly_or_fail_whole(settings: Settings, tmp_path: Path) -> None:
    from consent.service import ConsentService
    from data.dce_import import import_exports
    from data.store import Store

    originals = _fixtures()
    rng = random.Random(SEED)
    work = tmp_path / "fuzz"
    work.mkdir()
    outcomes = {"ok": 0, "error": 0}
    crashes: list[str] = []

    async def go() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant(list(CONSENTING), "train", "fuzz", "cli")
            # Start from a populated store: a failed file must leave earlier imports exactly as they were.
            await import_exports(store, [FIXTURES])
            for case in range(CASES):
                data = mutate(rng, rng.choice(originals))
                path = work / f"case-{case:04d}.json"
                path.write_bytes(data)
                before = await _snapshot(store)
                try:
                    result = await import_exports(store, [path])
                except UserFacingError as exc:  # a whole-call refusal is fine as long as it is one clear line
                    result = {"files": [{"error": str(exc), "path": str(path)}]}
                except Exception as exc:
                    keep = tmp_path / f"crash-{case:04d}.json"
                    keep.write_bytes(data)
                    crashes.append(f"case {case} ({keep}): {type(exc).__name__}: {exc}"[:300])
                    continue
                report = result["files"][0]
                if report["error"]:
                    outcomes["error"] += 1
                    err = report["error"]
                    assert "\n" not in err, f"case {case}: multi-line error {err!r}"
                    assert str(path) in err, f"case {case}: error does not name the file: {err!r}"
                    assert await _snapshot(store) == before, f"case {case}: partial import after {err!r}"
                else:
                    outcomes["ok"] += 1
                path.unlink()
            # Whatever got in, nothing of a member without train consent did.
            assert await store.messages.authors() <= set(CONSENTING)
            rows = await store.fetchall("SELECT DISTINCT author_id FROM messages")
            train = await store.with_scope("train")
            assert {r[0] for r in rows} <= train
            # Ids of another JSON type are converted or refused, never stored as the repr of a dict or list.
            ids = [r[0] for r in await store.fetchall("SELECT id FROM messages")]
            assert all(isinstance(i, str) and i.isdigit() for i in ids), [
                i for i in ids if not str(i).isdigit()
            ][:5]

    asyncio.run(go())
    assert not crashes, f"{len(crashes)} of {CASES} inputs crashed the importer:\n" + "\n".join(crashes[:15])
    # The mutations must exercise both paths, or the fuzzer is not testing anything.
    assert outcomes["ok"] > CASES // 20 and outcomes["error"] > CASES // 5, outcomes


def _one_message_export(path: Path, **fields: Any) -> Path:
    msg = {
        "id": "4000",
        "type": "Default",
        "timestamp": "2024-01-01T10:00:00.123+01:00",
        "content": "hello there",
        "author": {"id": MAREN, "name": "maren", "isBot": False},
        "attachments": [],
        "reactions": [],
    }
    for key, value in fields.items():
        if value is _DROP:
            msg.pop(key)
        else:
            msg[key] = value
    doc = {"guild": {"id": "1"}, "channel": {"id": "2", "name": "c"}, "messages": [msg]}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


_DROP = object()


@pytest.mark.parametrize(
    "fields",
    [
        {"type": {}},
        {"type": ["Default"]},
        {"type": None},
        {"type": 7},
        {"reactions": [{"emoji": {"name": "x"}, "count": "NaN"}]},
        {"reactions": [{"emoji": {"name": "x"}, "count": {}}]},
        {"reactions": [{"emoji": {"name": "x"}, "count": "1e5"}]},
        {"reactions": [{"emoji": {"name": "x"}, "count": [3]}]},
        {"reactions": [{"emoji": {"name": {"n": 1}}, "count": 2}]},
        {"reactions": {"emoji": "x"}},
        {"reactions": ["x"]},
        {"id": {"id": "1"}},
        {"id": ["4000"]},
        {"id": True},
        {"id": 4000.5},
        {"author": {"id": {"id": MAREN}, "name": "maren"}},
        {"author": {"id": [MAREN]}},
        {"timestamp": 10**30},
        {"timestamp": "9999-12-31T23:59:59-14:00"},
        {"timestampEdited": {}},
        {"reference": {"messageId": {"x": 1}}},
        {"attachments": {"a": 1}},
        {"content": _DROP},
        {"content": ["hello"]},
        {"content": 12345},
    ],
    ids=lambda f: ",".join(f"{k}={'<drop>' if v is _DROP else json.dumps(v)[:24]}" for k, v in f.items()),
)
def test_a_field_of_the_wrong_type_is_skipped_or_refused_cleanly(
    settings: Settings, tmp_path: Path, fields: dict[str, Any]
) -> None:
    from consent.service import ConsentService
    from data.dce_import import import_exports
    from data.store import Store

    path = _one_message_export(tmp_path / "one.json", **fields)

    async def go() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([MAREN], "train", "fuzz", "cli")
            report = (await import_exports(store, [path]))["files"][0]
            ids = [r[0] for r in await store.fetchall("SELECT id FROM messages")]
            if report["error"]:
                assert str(path) in report["error"] and "\n" not in report["error"]
                assert ids == [] and not await store.keys.exists(MAREN)
            else:
                assert ids in ([], ["4000"]), ids
                if ids:
                    stored = await store.messages.get("4000")
                    assert stored is not None and stored.author_id == MAREN
                    assert all(isinstance(v, int) and v >= 0 for v in stored.reactions.values())

    asyncio.run(go())


def test_import_cli_on_mutated_exports_exits_0_or_2_with_one_line(tmp_path: Path) -> None:
    originals = _fixtures()
    rng = random.Random(SEED + 1)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DOPPEL_HOME": str(home), "DOPPEL_MASTER_KEY": ""}
    doppel = [sys.executable, "-m", "doppel"]
    granted = subprocess.run(
        [*doppel, "consent", "grant", *CONSENTING], env=env, capture_output=True, text=True, timeout=120
    )
    assert granted.returncode == 0, granted.stderr
    folder = tmp_path / "cases"
    folder.mkdir()
    # One CLI call per case would cost a Python start-up each: a folder of cases goes in one call, plus a few alone.
    for i in range(24):
        (folder / f"c{i:02d}.json").write_bytes(mutate(rng, rng.choice(originals)))
    singles = [folder / f"c{i:02d}.json" for i in range(4)]
    for target in [folder, *singles]:
        proc = subprocess.run(
            [*doppel, "import", str(target)], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode in (0, 2), (proc.returncode, proc.stderr)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode == 2:
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("doppel: error: "), proc.stderr
        else:
            assert proc.stderr.strip() == "", proc.stderr
    conn = sqlite3.connect(home / "doppel.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        authors = {r[0] for r in conn.execute("SELECT DISTINCT author_id FROM messages")}
    finally:
        conn.close()
    assert authors <= set(CONSENTING)
