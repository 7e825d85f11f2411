"""DiscordChatExporter import: real DCE captures for the format, hand-made exports for consent and import rules.

Real captures (MIT, tests/fixtures/dce/stoat-ferry) hold only a bot's messages: as they are they test that the
format parses and nothing is stored; with the bot flag cleared in a copy they test exact counts of stored messages.
The hand-made exports (tests/fixtures/dce/handmade) carry the traps that need human authors.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from data.dce_import import expand_paths, import_exports, utc_epoch
from data.errors import ImportFileError
from data.store import Store
from doppel.erasure import erasure_parts
from tests.helpers.dce_fixtures import (
    CHILL,
    CHILL_LATER,
    DELETED_USER,
    DM,
    FERRY_BOT,
    GENERAL,
    GROUP_DM,
    HANDMADE,
    MAREN,
    REAL,
    ROS,
    SERVER_DELETED_USER,
    TEO,
    THREAD,
    humanised,
)

# Worked out by reading the files (D-Ferry's bot granted `train`, which a bot's messages never need).
REAL_EXPECTED = {
    "dce-2.47.1/Discord Ferry Test - feedback-forum - Bug Report [1506019530294562938].json": dict(
        read=1, skipped={"bot": 1}
    ),
    # Type "21" (a thread's starter placeholder) has no name in DCE 2.47.1: an unknown type is a system message.
    "dce-2.47.1/Discord Ferry Test - general - Cool Thread [1506019505778987190].json": dict(
        read=2, skipped={"bot": 1, "system": 1}
    ),
    "dce-2.47.1/Discord Ferry Test - general [1506019498094891120].json": dict(
        read=11, skipped={"bot": 10, "system": 1}
    ),
    "dce-2.48/Discord Ferry Test - feedback-forum - Bug Report [1543572393384087642].json": dict(
        read=1, skipped={"bot": 1}
    ),
    "dce-2.48/Discord Ferry Test - general - Cool Thread [1543572368977428611].json": dict(
        read=2, skipped={"bot": 2}
    ),
    "dce-2.48/Discord Ferry Test - general [1543572361285083187].json": dict(
        read=11, skipped={"bot": 10, "system": 1}
    ),
}
# The same files with the bot flag cleared: every Default message is stored, ThreadCreated and "21" are not.
# DCE 2.48 writes a thread's starter message into the thread's export too (same id as the thread): the thread file
# sorts first and keeps it; the parent channel's copy is then already stored, not an id conflict.
HUMANISED_EXPECTED = {
    "dce-2.47.1/Discord Ferry Test - feedback-forum - Bug Report [1506019530294562938].json": dict(
        read=1, stored=1, skipped={}
    ),
    "dce-2.47.1/Discord Ferry Test - general - Cool Thread [1506019505778987190].json": dict(
        read=2, stored=1, skipped={"system": 1}
    ),
    "dce-2.47.1/Discord Ferry Test - general [1506019498094891120].json": dict(
        read=11, stored=10, skipped={"system": 1}
    ),
    "dce-2.48/Discord Ferry Test - feedback-forum - Bug Report [1543572393384087642].json": dict(
        read=1, stored=1, skipped={}
    ),
    "dce-2.48/Discord Ferry Test - general - Cool Thread [1543572368977428611].json": dict(
        read=2, stored=2, skipped={}
    ),
    "dce-2.48/Discord Ferry Test - general [1543572361285083187].json": dict(
        read=11, stored=9, already_stored=1, skipped={"system": 1}
    ),
}

# Hand-made exports, worked out by reading them (consenting: Maren, Teo, Ros; files import in name order).
EXPECTED = {
    # "tallybot" is not flagged isBot: it is skipped for lack of consent, not as a bot. messageCount says 35.
    CHILL.name: dict(read=6, stored=4, skipped={"no_consent": 2}),
    # Exported later: the spam is gone, messageCount still says 35, and Teo's edit since replaces the stored copy.
    CHILL_LATER.name: dict(read=5, stored=0, already_stored=4, updated=1, skipped={"no_consent": 1}),
    # A DM: guild id "0", a bot, a Call.
    DM.name: dict(read=3, stored=1, skipped={"bot": 1, "system": 1}),
    GENERAL.name: dict(
        read=20, stored=10, skipped={"attachment_only": 2, "no_consent": 4, "sticker_only": 1, "system": 3}
    ),
    # Ros's reply reuses the DM file's message id in another channel: a broken export, not a duplicate.
    GROUP_DM.name: dict(read=6, stored=0, skipped={"id_conflict": 1, "no_consent": 2, "system": 3}),
    # The duplicated id belongs to "Deleted User", who has no consent.
    SERVER_DELETED_USER.name: dict(read=5, stored=3, skipped={"no_consent": 2}),
    THREAD.name: dict(read=5, stored=3, skipped={"no_consent": 2}),
}
MAPLE_HOLLOW = "600000000000000001"


async def _grant(store: Store, *ids: str) -> None:
    from consent.service import ConsentService

    await ConsentService(store).grant(list(ids), "train", "test", "cli")


def _import(
    settings: Settings, paths: list[Any], grant: tuple[str, ...] = (MAREN, TEO, ROS)
) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with Store.open(settings) as store:
            await _grant(store, *grant)
            return await import_exports(store, paths)

    return asyncio.run(go())


def _dump(settings: Settings) -> list[tuple[Any, ...]]:
    async def go() -> list[tuple[Any, ...]]:
        async with Store.open(settings) as store:
            rows = await store.fetchall("SELECT * FROM messages ORDER BY id")
            rows += await store.fetchall("SELECT id, name, display_name FROM members ORDER BY id")
            rows += await store.fetchall("SELECT member_id FROM member_keys ORDER BY member_id")
            return [tuple(r) for r in rows]

    return asyncio.run(go())


def _by_file(result: dict[str, Any], root: Path) -> dict[str, dict[str, Any]]:
    return {Path(f["path"]).relative_to(root).as_posix(): f for f in result["files"]}


def _assert_counts(by_name: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    """Each file's report is exactly what its expected row says (counts the row leaves out are zero)."""
    assert set(by_name) == set(expected)
    for name, want in expected.items():
        got = by_name[name]
        assert got["error"] is None, name
        assert (got["read"], got["skipped"]) == (want["read"], want["skipped"]), name
        for key in ("stored", "already_stored", "updated", "duplicates"):
            assert got[key] == want.get(key, 0), (name, key)


def test_real_exports_parse_whole_and_store_no_bot_message(settings: Settings) -> None:
    async def grant_only() -> None:
        async with Store.open(settings) as store:
            await _grant(store, FERRY_BOT)

    asyncio.run(grant_only())
    granted = _dump(settings)  # what the grant alone writes, to compare against
    result = _import(settings, [REAL], grant=(FERRY_BOT,))
    _assert_counts(_by_file(result, REAL), REAL_EXPECTED)
    assert result["total"]["read"] == 28 and result["total"]["stored"] == 0
    # A bot's messages leave nothing behind, even with its consent: no message, no member name, no key.
    assert _dump(settings) == granted


def test_real_exports_with_the_bot_flag_cleared_import_with_exact_counts(
    settings: Settings, tmp_path: Path
) -> None:
    copy = humanised(tmp_path / "real")
    result = _import(settings, [copy], grant=(FERRY_BOT,))
    _assert_counts(_by_file(result, copy), HUMANISED_EXPECTED)
    assert result["total"]["stored"] == 24 and result["total"]["read"] == 28

    async def check() -> None:
        async with Store.open(settings) as store:
            assert await store.messages.authors() == {FERRY_BOT}
            members = [(m.id, m.display_name) for m in await store.members.list()]
            assert members == [(FERRY_BOT, "D-Ferry Test app")]
            # ThreadCreated (its reference has a null messageId) and type "21" are not stored.
            assert await store.messages.get("1506019526855360598") is None
            assert await store.messages.get("1506019526855360593") is None
            # The embed is not stored, its message's text is.
            embed = await store.messages.get("1506019525009739841")
            assert embed is not None and embed.content.startswith("Message with rich embed")
            assert (embed.attachments, embed.reactions, embed.reply_to) == (0, {}, None)
            # "+03:00" is read as an offset: 22:43:56.317 in Helsinki is 19:43:56.317 UTC.
            reply = await store.messages.get("1506019529476800745")
            assert reply is not None and reply.channel_name == "Cool Thread"
            assert reply.created_at == pytest.approx(
                datetime(2026, 5, 18, 19, 43, 56, 317000, UTC).timestamp()
            )
            assert reply.guild_id == "1505988963628879902" and reply.channel_id == "1506019505778987190"
            # The 2.48 thread starter is stored once, in the thread that was imported first.
            starter = await store.messages.get("1543572368977428611")
            assert starter is not None and starter.channel_id == "1543572368977428611"
            assert all(m.reply_to is None for m in await store.messages.for_member(FERRY_BOT))

    asyncio.run(check())
    before = _dump(settings)
    again = _import(settings, [copy], grant=(FERRY_BOT,))
    total = again["total"]
    assert (total["stored"], total["already_stored"], total["updated"]) == (0, 25, 0)
    assert total["skipped"] == {"system": 3}
    assert _dump(settings) == before


def test_handmade_exports_import_with_exact_counts(settings: Settings) -> None:
    result = _import(settings, [HANDMADE])
    _assert_counts({Path(f["path"]).name: f for f in result["files"]}, EXPECTED)
    assert result["total"]["stored"] == 21 and result["total"]["read"] == 50

    async def check() -> None:
        async with Store.open(settings) as store:
            assert await store.messages.authors() == {MAREN, TEO, ROS}
            assert await store.messages.count(MAREN) + await store.messages.count(TEO) == 17
            # Non-consenting authors leave no name behind either.
            assert {m.id for m in await store.members.list()} == {MAREN, TEO, ROS}
            edited = [m for m in await store.messages.for_member(MAREN) if m.edited_at]
            assert len(edited) == 1
            assert edited[0].created_at == pytest.approx(utc_epoch("2025-03-14T09:20:05.779+01:00"))
            assert edited[0].edited_at == pytest.approx(
                datetime(2025, 3, 14, 8, 21, 30, 100000, UTC).timestamp()
            )
            # A reaction without a `users` list (DCE before 2.40.4) still counts.
            eyes = await store.messages.get("800000000000000112")
            assert eyes is not None and eyes.reactions == {"👀": 1} and eyes.guild_id == MAPLE_HOLLOW
            assert eyes.channel_name == "general" and eyes.source == "import"
            plan = await store.messages.get("800000000000000113")
            assert plan is not None and plan.attachments == 1 and plan.content == "Here is the table plan."
            replies = {m.id: m.reply_to for m in await store.messages.for_member(TEO) if m.reply_to}
            # The chill-talk one answers tallybot's spam, which is not stored: the reference is kept as written.
            assert replies == {
                "800000000000000104": "800000000000000101",
                "800000000000000111": "800000000000000109",
                "800000000000000303": "800000000000000302",
            }
            # A Default message that carries a reference is a reply too.
            answer = await store.messages.get("800000000000000106")
            assert answer is not None and answer.reply_to == "800000000000000105"
            # The later export's edit won over the first export's copy.
            thanks = await store.messages.get("800000000000000305")
            assert thanks is not None and thanks.content == "thanks ❤️ ❤️" and thanks.edited_at is not None
            dm = await store.messages.get("800000000000000401")
            # The DM's guild id "0" is stored as no guild.
            assert dm is not None and dm.guild_id is None and dm.content == "did the oven get fixed?"
            assert dm.reactions == {"👆": 3} and dm.channel_id == "600000000000000020"
            hearts = await store.messages.get("800000000000000604")
            assert hearts is not None and hearts.reactions == {"ovenmitt": 3, "❤": 1}
            both = await store.messages.get("800000000000000603")
            assert both is not None and both.attachments == 1  # text with a file and a sticker is stored

    asyncio.run(check())


def test_reimport_stores_nothing_new(settings: Settings) -> None:
    _import(settings, [HANDMADE])
    before = _dump(settings)
    again = _import(settings, [HANDMADE])
    assert again["total"]["stored"] == 0 and again["total"]["updated"] == 0
    assert again["total"]["already_stored"] == 25  # 21 + the 4 shared by the two chill-talk files
    assert _dump(settings) == before


def test_an_older_copy_does_not_undo_a_later_edit(settings: Settings) -> None:
    _import(settings, [CHILL_LATER])
    older = _import(settings, [CHILL])["files"][0]
    assert (older["stored"], older["already_stored"], older["updated"]) == (0, 4, 0)

    async def check() -> None:
        async with Store.open(settings) as store:
            thanks = await store.messages.get("800000000000000305")
            assert thanks is not None and thanks.content == "thanks ❤️ ❤️"

    asyncio.run(check())


def test_duplicate_ids_inside_a_file_are_counted(settings: Settings) -> None:
    result = _import(settings, [SERVER_DELETED_USER], grant=(ROS, DELETED_USER))
    f = result["files"][0]
    assert (f["read"], f["stored"], f["duplicates"], f["already_stored"]) == (5, 4, 1, 0)


def test_corrupted_copy_is_rejected_whole_and_others_still_import(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    data = GENERAL.read_bytes()
    cut = int(len(data) * 0.8)
    (folder / "a-truncated.json").write_bytes(data[:cut])
    shutil.copy(CHILL, folder / "b-chill.json")
    before = _dump(settings)
    result = _import(settings, [folder])
    bad, good = result["files"]
    assert bad["error"] is not None and "a-truncated.json" in bad["error"] and "truncated" in bad["error"]
    assert f"byte {cut}" in bad["error"]
    assert bad["stored"] == 0 and good["error"] is None and good["stored"] == 4
    assert result["total"]["failed"] == 1 and result["total"]["stored"] == 4

    async def check() -> None:
        async with Store.open(settings) as store:
            # Nothing of the failed file: not its messages, not its members, not a key made for it.
            ids = {r[0] for r in await store.fetchall("SELECT id FROM messages")}
            general_ids = {m["id"] for m in json.loads(data)["messages"]}
            assert not ids & general_ids
            assert {r[0] for r in await store.fetchall("SELECT member_id FROM member_keys")} == {MAREN, TEO}

    asyncio.run(check())
    assert before != _dump(settings)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"this is not json at all", "invalid JSON"),
        (b'{"guild": {"id": "1"}, "messages": []}', "no channel"),
        (
            b'{"guild": {"id": "1"}, "channel": {"id": "2"}, "messages": [{"id": "3", "type": "Default"}]}',
            "message #0",
        ),
        (
            b'{"guild": {"id": "1"}, "channel": {"id": "2"}, "messages": [{"id": "3", "author": {"id": "4"},'
            b' "content": "hi", "timestamp": "yesterday"}]}',
            "bad timestamp",
        ),
        (b'{"guild": {"id": "1"}, "channel": {"id": "2"}}', "no messages array"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(
    settings: Settings, tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = _import(settings, [path], grant=("4",))
    error = result["files"][0]["error"]
    assert error is not None and str(path) in error and needle in error

    async def check() -> None:
        async with Store.open(settings) as store:
            assert await store.messages.count() == 0
            assert not await store.keys.exists("4")

    asyncio.run(check())


def test_missing_path_fails_before_importing(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="no such file"):
        expand_paths([tmp_path / "nope.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportFileError, match="no .json export files"):
        expand_paths([tmp_path / "empty"])


def test_timestamps_with_offsets_and_long_fractions() -> None:
    assert utc_epoch("2023-01-06T16:05:35.86+00:00") == pytest.approx(1673021135.86)
    assert utc_epoch("2023-01-06T18:05:35.8612345+02:00") == pytest.approx(1673021135.861234)
    assert utc_epoch("2023-01-06T10:35:35-05:30") == pytest.approx(1673021135.0)


def test_revoked_member_is_not_imported(settings: Settings) -> None:
    async def go() -> dict[str, Any]:
        from consent.service import ConsentService

        async with Store.open(settings) as store:
            svc = ConsentService(store, erasure_parts())
            await svc.grant([MAREN, TEO], "train", "t", "cli")
            await svc.revoke([TEO], "train", "t", "cli")
            return await import_exports(store, [GENERAL])

    result = asyncio.run(go())
    # Maren's 11 messages minus her pin notice, "Started a thread.", sticker-only and 2 attachment-only; none of Teo's.
    assert result["files"][0]["stored"] == 6
    assert result["files"][0]["skipped"]["no_consent"] == 8  # Teo's 4 with text, Juno's 3, tallybot's 1


def test_reimport_with_a_later_edit_updates_the_stored_copy(settings: Settings, tmp_path: Path) -> None:
    _import(settings, [GENERAL])
    doc = json.loads(GENERAL.read_text(encoding="utf-8"))
    target = next(
        m for m in doc["messages"] if m["author"]["id"] == MAREN and m["content"] and m["type"] == "Default"
    )
    target["content"] = "edited: nothing to see"
    target["timestampEdited"] = "2025-03-15T10:00:00.1234567+01:00"
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc), encoding="utf-8")
    result = _import(settings, [newer])
    assert (result["total"]["stored"], result["total"]["updated"]) == (0, 1)
    assert _import(settings, [newer])["total"]["updated"] == 0  # the same edit again changes nothing

    async def check() -> None:
        async with Store.open(settings) as store:
            msg = await store.messages.get(target["id"])
            assert msg is not None and msg.content == "edited: nothing to see"
            assert msg.edited_at == pytest.approx(utc_epoch("2025-03-15T10:00:00.123456+01:00"))

    asyncio.run(check())


def test_an_upload_stores_only_the_uploaders_messages(settings: Settings) -> None:
    async def go() -> dict[str, Any]:
        async with Store.open(settings) as store:
            await _grant(store, MAREN, TEO)
            result = await import_exports(store, [GENERAL], source="upload", only_authors=[TEO])
            assert await store.messages.authors() == {TEO}
            assert {m.source for m in await store.messages.for_member(TEO)} == {"upload"}
            return result

    f = asyncio.run(go())["files"][0]
    # 20 read - 3 system - 3 without text (checked first) - 4 of Teo = 10 by other authors.
    assert f["stored"] == 4 and f["skipped"]["other_author"] == 10


def test_upload_only_consent_covers_the_members_own_upload_not_a_server_import(settings: Settings) -> None:
    async def go() -> tuple[set[str], set[str]]:
        from consent.service import ConsentService

        async with Store.open(settings) as store:
            svc = ConsentService(store, erasure_parts())
            await svc.grant([MAREN], "train", MAREN, "button")  # opted in to recording
            await svc.grant([TEO], "train", TEO, "upload")  # consented to his own export only
            await import_exports(store, [GENERAL])  # an admin's server import
            after_server_import = set(await store.messages.authors())
            await import_exports(store, [GENERAL], source="upload", upload_owner=TEO)
            return after_server_import, set(await store.messages.authors())

    server_import, after_own_upload = asyncio.run(go())
    assert server_import == {MAREN}, "an upload grant does not let an admin's import store Teo's messages"
    assert after_own_upload == {MAREN, TEO}, "his own upload does"
