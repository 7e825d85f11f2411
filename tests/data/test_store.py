"""The store: schema + migrations, pragmas, encryption per member, repositories."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from core.settings import Settings
from data.crypto import message_ad, unseal
from data.errors import MasterKeyError
from data.migrations import MIGRATIONS
from data.records import Member, Message
from data.store import Store

ALICE, BOB = "111111111111111111", "222222222222222222"


def msg(mid: str, author: str, content: str, channel: str = "c1", ts: float = 1.0) -> Message:
    return Message(mid, "g1", channel, "general", author, f"name-{author[-2:]}", ts, content)


async def _grant(store: Store, *ids: str) -> None:
    from consent.service import ConsentService

    await ConsentService(store).grant(list(ids), "train", "test", "cli")


def test_open_applies_migrations_once_and_sets_pragmas(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            names = [r[0] for r in await store.fetchall("SELECT name FROM _migrations ORDER BY name")]
            assert names == sorted(m.__name__ for m in MIGRATIONS)
            assert (await store.fetchone("PRAGMA journal_mode"))[0] == "wal"
            assert (await store.fetchone("PRAGMA secure_delete"))[0] == 1
            assert (await store.fetchone("PRAGMA foreign_keys"))[0] == 1
            tables = set(await store.tables())
            assert {
                "members",
                "consent",
                "consent_audit",
                "member_keys",
                "messages",
                "jobs",
                "adapters",
                "adapter_lineage",
                "embeddings",
                "feedback",
                "guild_settings",
            } <= tables
        store = await Store.open(settings)  # second open: nothing re-applied, no error
        try:
            count = (await store.fetchone("SELECT COUNT(*) FROM _migrations"))[0]
            assert count == len(MIGRATIONS)
        finally:
            await store.close()

    asyncio.run(go())


def test_key_file_is_private_and_env_key_must_be_valid(settings: Settings, doppel_home: Path) -> None:
    async def go() -> None:
        async with Store.open(settings):
            pass

    asyncio.run(go())
    mode = stat.S_IMODE(os.stat(settings.key_path).st_mode)
    assert mode == 0o600
    bad = Settings.load(env={"DOPPEL_HOME": str(doppel_home), "DOPPEL_MASTER_KEY": "not-a-key"})
    with pytest.raises(MasterKeyError, match="32 bytes"):
        asyncio.run(Store._open(bad))


def test_wrong_master_key_is_a_clear_error(settings: Settings, doppel_home: Path) -> None:
    async def fill() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE)
            assert await store.messages.add_many([msg("1", ALICE, "hello")]) == 1

    asyncio.run(fill())
    other = Settings.load(env={"DOPPEL_HOME": str(doppel_home), "DOPPEL_MASTER_KEY": "ab" * 32})

    async def read() -> None:
        async with Store.open(other) as store:
            await store.messages.for_member(ALICE)

    with pytest.raises(MasterKeyError, match="does not open"):
        asyncio.run(read())


def test_messages_only_for_train_consent_and_round_trip(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE)
            batch = [
                msg("1", ALICE, "héllo ✨", ts=2.0),
                msg("2", BOB, "not mine to keep"),
                msg("3", ALICE, "x", "c0"),
            ]
            assert await store.messages.add_many(batch) == 2
            assert await store.messages.add_many(batch) == 0  # idempotent
            assert await store.messages.count() == 2 and await store.messages.count(BOB) == 0
            assert [m.content for m in await store.messages.for_member(ALICE)] == ["x", "héllo ✨"]
            assert await store.messages.channels_of(ALICE) == ["c0", "c1"]
            seen = [m.id async for m in store.messages.iter_channels(["c1", "c0"])]
            assert seen == ["3", "1"]
            row = await store.fetchone("SELECT content FROM messages WHERE id = '1'")
            assert "héllo".encode() not in row[0]

    asyncio.run(go())


def test_ciphertext_is_bound_to_its_row(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE)
            await store.messages.add_many([msg("1", ALICE, "first"), msg("2", ALICE, "second")])
            aead = await store.keys.cipher(ALICE)
            blob = (await store.fetchone("SELECT content FROM messages WHERE id = '1'"))[0]
            assert unseal(aead, blob, message_ad(ALICE, "1")) == b"first"
            # Moving ciphertext to another row must not decrypt: the associated data names message and author.
            async with store.write() as db:
                await db.execute("UPDATE messages SET content = ? WHERE id = '2'", (blob,))
            assert await store.messages.get("2") is None
            assert (await store.messages.get("1")).content == "first"

    asyncio.run(go())


def test_edit_delete_and_embeddings(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE)
            await store.messages.add_many([msg("1", ALICE, "old"), msg("2", ALICE, "keep")])
            assert await store.embeddings.put(ALICE, "mini", [("1", b"\x01" * 16), ("2", b"\x02" * 16)]) == 2
            assert await store.embeddings.put(BOB, "mini", [("9", b"\x03")]) == 0
            raw = await store.fetchall("SELECT vector FROM embeddings")
            assert all(b"\x01" * 16 not in r[0] for r in raw)
            assert await store.messages.edit("1", "new", 5.0)
            edited = await store.messages.get("1")
            assert edited.content == "new" and edited.edited_at == 5.0
            assert await store.embeddings.get(ALICE, "mini") == [("2", b"\x02" * 16)]
            assert await store.messages.delete("2") and not await store.messages.delete("2")
            assert await store.embeddings.count() == 0

    asyncio.run(go())


def test_members_guilds_feedback(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            await store.members.upsert(Member(ALICE, "alice", "Ally"))
            await store.members.upsert(Member(ALICE, "alice", "Alice B"))
            assert (await store.members.get(ALICE)).display_name == "Alice B"
            g = await store.guilds.get("5")
            assert g.recording_enabled is False
            g = await store.guilds.set(
                "5", recording_enabled=True, acknowledged_by=ALICE, channel_allowlist=["7"]
            )
            assert g.recording_enabled and g.channel_allowlist == ("7",) and g.acknowledged_by == ALICE
            with pytest.raises(ValueError):
                await store.guilds.set("5", bogus=1)
            fid = await store.feedback.add(ALICE, BOB, 1, prompt="hi", reply="secret reply")
            assert fid > 0
            raw = (await store.fetchone("SELECT payload FROM feedback"))[0]
            assert b"secret reply" not in raw
            assert (await store.feedback.for_persona(ALICE))[0]["reply"] == "secret reply"
            assert (await store.feedback.given_by(BOB))[0]["value"] == 1

    asyncio.run(go())


def test_failed_write_rolls_back_and_forgets_new_key(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE)
            with pytest.raises(RuntimeError):
                async with store.write():
                    await store.keys.cipher(ALICE, create=True)
                    raise RuntimeError("boom")
            assert not await store.keys.exists(ALICE)
            assert store.keyring.cached(ALICE) is None
            assert await store.messages.add_many([msg("1", ALICE, "ok")]) == 1
            assert (await store.messages.get("1")).content == "ok"

    asyncio.run(go())


def test_a_write_cancelled_while_begin_waits_leaves_no_open_transaction(settings: Settings) -> None:
    # A job's heartbeat is cancelled whenever its trainer ends; if that lands while its BEGIN waits for the file lock,
    # the statement still runs in aiosqlite's thread, and the connection must not be left inside that transaction.
    async def go() -> None:
        async with Store.open(settings) as store:
            async with store.write() as db:
                await db.execute("CREATE TABLE scratch (x INTEGER)")
            other = sqlite3.connect(settings.db_path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: our BEGIN waits

            async def heartbeat() -> None:
                async with store.write() as db:
                    await db.execute("INSERT INTO scratch VALUES (1)")

            task = asyncio.create_task(heartbeat())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.sleep(0.1)
            other.execute("COMMIT")
            other.close()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not store.db.in_transaction
            async with store.write() as db:
                await db.execute("INSERT INTO scratch VALUES (2)")
            assert [r[0] for r in await store.fetchall("SELECT x FROM scratch")] == [2]

    asyncio.run(go())


def test_writes_cancelled_at_any_point_are_whole_or_absent(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            async with store.write() as db:
                await db.execute("CREATE TABLE scratch (x INTEGER, y INTEGER)")

            async def pair(n: int) -> None:
                async with store.write() as db:
                    await db.execute("INSERT INTO scratch VALUES (?, 1)", (n,))
                    await db.execute("INSERT INTO scratch VALUES (?, 2)", (n,))

            outcomes = set()
            for n in range(60):
                task = asyncio.create_task(pair(n))
                for _ in range(n % 15):  # cancel at successive points: before BEGIN, in it, the body, COMMIT
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                    outcomes.add("done")
                except asyncio.CancelledError:
                    outcomes.add("cancelled")
                assert not store.db.in_transaction, f"cancelled after {n % 15} loop steps"
            rows = await store.fetchall("SELECT x, COUNT(*) FROM scratch GROUP BY x")
            assert all(count == 2 for _, count in rows), "a cancelled write is rolled back whole"
            assert "cancelled" in outcomes
            async with store.write() as db:
                await db.execute("INSERT INTO scratch VALUES (99, 1)")

    asyncio.run(go())


def test_display_names_in_batches_of_known_members_only(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            ids = [
                str(10_000 + i) for i in range(1200)
            ]  # more than one batch, more than SQLite's old 999 limit
            for mid in ids:
                await store.members.upsert(Member(mid, f"m{mid}", f"Member {mid}"))
            names = await store.members.display_names([*ids, ids[0], "404"])
            assert len(names) == 1200 and names[ids[-1]] == f"Member {ids[-1]}" and "404" not in names
            assert await store.members.display_names([]) == {}

    asyncio.run(go())


def test_feedback_rated_is_per_reply_and_rater(settings: Settings) -> None:
    async def go() -> None:
        async with Store.open(settings) as store:
            assert not await store.feedback.rated("900", BOB)
            await store.feedback.add(ALICE, BOB, -1, message_id="900")
            assert await store.feedback.rated("900", BOB)
            assert not await store.feedback.rated("900", ALICE) and not await store.feedback.rated("901", BOB)

    asyncio.run(go())


def test_train_ready_counts_consenting_authors_most_first(settings: Settings) -> None:
    carol, dave = "333333333333333333", "444444444444444444"

    async def go() -> None:
        async with Store.open(settings) as store:
            await _grant(store, ALICE, BOB, carol, dave)
            counts = {ALICE: 3, BOB: 5, carol: 1, dave: 3}
            await store.messages.add_many(
                [msg(f"{who}-{k}", who, "hi", ts=float(k)) for who, n in counts.items() for k in range(n)]
            )
            ready = store.messages.train_ready
            # At least 2 messages, most first, ties by id; `limit` keeps the first ones.
            assert await ready(2) == {BOB: 5, ALICE: 3, dave: 3}
            assert list(await ready(2, limit=2)) == [BOB, ALICE]
            assert await store.messages.count_train_ready(2) == 3
            # Leaving members out: any number of ids goes in one parameter.
            many = {BOB, *(str(i) for i in range(5000))}
            assert await ready(2, excluding=many) == {ALICE: 3, dave: 3}
            assert await store.messages.count_train_ready(2, excluding=many) == 2
            assert await ready(1) == {BOB: 5, ALICE: 3, dave: 3, carol: 1}
            assert await ready(6) == {} and await store.messages.count_train_ready(6) == 0

    asyncio.run(go())
