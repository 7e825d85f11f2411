"""DiscordChatExporter import against the real fixture exports: exact counts, idempotence, whole-file rollback."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from data.dce_import import expand_paths, import_exports, utc_epoch
from data.errors import ImportFileError
from data.store import Store

ADAM, THOMAS, PATRICK, MLOMB = (
    "521486476985155645",
    "896568767994532880",
    "627848643557663699",
    "111111111111111111",
)
DELETED_USER = "555555555555555555"
GENERAL = "dcef-Example_guild_-_Text_Channels_-_general__1012224565567721552_.json"
CHILL = "dcef-Example_guild_-_Text_Channels_-_chill_talk__1012224565567125544_.json"

# Worked out by reading the files (consenting: Adam, Thomas, mlomb; files import in name order).
EXPECTED = {
    "chat-analytics-DM_2A_2M.json": dict(read=3, stored=1, skipped={"bot": 1, "system": 1}),
    # mlomb's message reuses the DM file's message id in another channel: a broken export, not a duplicate.
    "chat-analytics-GC_3A_5M.json": dict(
        read=6, stored=0, skipped={"id_conflict": 1, "no_consent": 2, "system": 3}
    ),
    # The duplicated id belongs to "Deleted User", who has no consent.
    "chat-analytics-SV_5A_5M.json": dict(read=5, stored=3, skipped={"no_consent": 2}),
    # "aLittleSpammyBot" is not flagged isBot: it is skipped for lack of consent, not as a bot.
    CHILL: dict(read=6, stored=4, skipped={"no_consent": 2}),
    # messageCount says 35 in both chill-talk files; the arrays hold 6 and 5.
    "dcef-Example_guild_-_Text_Channels_-_chill_talk__1012224565567125544__without_deleted_message.json": dict(
        read=5, stored=0, already_stored=4, skipped={"no_consent": 1}
    ),
    GENERAL: dict(
        read=35, stored=23, skipped={"attachment_only": 2, "no_consent": 5, "sticker_only": 1, "system": 4}
    ),
    "dcef-Example_guild_-_general_-_Thomas_is_Thomas__1060927310439657577_.json": dict(
        read=5, stored=3, skipped={"no_consent": 2}
    ),
}


async def _grant(store: Store, *ids: str) -> None:
    from consent.service import ConsentService

    await ConsentService(store).grant(list(ids), "train", "test", "cli")


def _import(
    settings: Settings, paths: list[Any], grant: tuple[str, ...] = (ADAM, THOMAS, MLOMB)
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


def test_fixture_exports_import_with_exact_counts(settings: Settings, dce_dir: Path) -> None:
    result = _import(settings, [dce_dir])
    by_name = {Path(f["path"]).name: f for f in result["files"]}
    assert set(by_name) == set(EXPECTED)
    for name, want in EXPECTED.items():
        got = by_name[name]
        assert got["error"] is None, name
        assert (got["read"], got["stored"], got["skipped"]) == (
            want["read"],
            want["stored"],
            want["skipped"],
        ), name
        assert got["already_stored"] == want.get("already_stored", 0), name
        assert got["duplicates"] == 0, name
    assert result["total"]["stored"] == 34 and result["total"]["read"] == 65

    async def check() -> None:
        async with Store.open(settings) as store:
            assert await store.messages.authors() == {ADAM, THOMAS, MLOMB}
            assert await store.messages.count(ADAM) + await store.messages.count(THOMAS) == 30
            # Non-consenting authors leave no name behind either.
            assert {m.id for m in await store.members.list()} == {ADAM, THOMAS, MLOMB}
            edited = [m for m in await store.messages.for_member(ADAM) if m.edited_at]
            assert len(edited) == 1
            assert edited[0].created_at == pytest.approx(utc_epoch("2023-01-06T14:23:05.779+00:00"))
            eyes = await store.messages.get("1060926346089476176")
            assert eyes is not None and eyes.reactions == {"👀": 1} and eyes.guild_id == "748545324524575035"
            assert eyes.channel_name == "general" and eyes.source == "import"
            replies = [m for m in await store.messages.for_member(THOMAS) if m.reply_to]
            assert replies, "reply references are stored"
            dm = await store.messages.get("530805779645595660")
            assert dm is not None and dm.guild_id is None and dm.content == "blah"  # DM guild id "0" -> None

    asyncio.run(check())


def test_reimport_stores_nothing_new(settings: Settings, dce_dir: Path) -> None:
    _import(settings, [dce_dir])
    before = _dump(settings)
    again = _import(settings, [dce_dir])
    assert again["total"]["stored"] == 0
    assert again["total"]["already_stored"] == 38  # 34 + the 4 shared by the two chill-talk files
    assert _dump(settings) == before


def test_duplicate_ids_inside_a_file_are_counted(settings: Settings, dce_dir: Path) -> None:
    result = _import(settings, [dce_dir / "chat-analytics-SV_5A_5M.json"], grant=(MLOMB, DELETED_USER))
    f = result["files"][0]
    assert (f["read"], f["stored"], f["duplicates"], f["already_stored"]) == (5, 4, 1, 0)


def test_corrupted_copy_is_rejected_whole_and_others_still_import(
    settings: Settings, dce_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    data = (dce_dir / GENERAL).read_bytes()
    cut = int(len(data) * 0.8)
    (folder / "a-truncated.json").write_bytes(data[:cut])
    shutil.copy(dce_dir / CHILL, folder / "b-chill.json")
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
            assert {r[0] for r in await store.fetchall("SELECT member_id FROM member_keys")} == {ADAM, THOMAS}

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


def test_revoked_member_is_not_imported(settings: Settings, dce_dir: Path) -> None:
    async def go() -> dict[str, Any]:
        from consent.service import ConsentService

        async with Store.open(settings) as store:
            svc = ConsentService(store)
            await svc.grant([ADAM, THOMAS], "train", "t", "cli")
            await svc.revoke([THOMAS], "train", "t", "cli")
            return await import_exports(store, [dce_dir / GENERAL])

    result = asyncio.run(go())
    # Adam's 19 messages minus his "Started a thread", sticker-only and attachment-only ones; none of Thomas's.
    assert result["files"][0]["stored"] == 16


def test_reimport_with_a_later_edit_updates_the_stored_copy(
    settings: Settings, dce_dir: Path, tmp_path: Path
) -> None:
    _import(settings, [dce_dir / GENERAL])
    doc = json.loads((dce_dir / GENERAL).read_text(encoding="utf-8"))
    target = next(
        m for m in doc["messages"] if m["author"]["id"] == ADAM and m["content"] and m["type"] == "Default"
    )
    target["content"] = "edited: nothing to see"
    target["timestampEdited"] = "2023-01-07T10:00:00.1234567+01:00"
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc), encoding="utf-8")
    result = _import(settings, [newer])
    assert (result["total"]["stored"], result["total"]["updated"]) == (0, 1)
    assert _import(settings, [newer])["total"]["updated"] == 0  # the same edit again changes nothing

    async def check() -> None:
        async with Store.open(settings) as store:
            msg = await store.messages.get(target["id"])
            assert msg is not None and msg.content == "edited: nothing to see"
            assert msg.edited_at == pytest.approx(utc_epoch("2023-01-07T10:00:00.123456+01:00"))

    asyncio.run(check())


def test_an_upload_stores_only_the_uploaders_messages(settings: Settings, dce_dir: Path) -> None:
    async def go() -> dict[str, Any]:
        async with Store.open(settings) as store:
            await _grant(store, ADAM, THOMAS)
            result = await import_exports(store, [dce_dir / GENERAL], source="upload", only_authors=[THOMAS])
            assert await store.messages.authors() == {THOMAS}
            assert {m.source for m in await store.messages.for_member(THOMAS)} == {"upload"}
            return result

    f = asyncio.run(go())["files"][0]
    # 35 read - 4 system - 3 without text (checked first) - 7 of Thomas = 21 by other authors.
    assert f["stored"] == 7 and f["skipped"]["other_author"] == 21


def test_upload_only_consent_covers_the_members_own_upload_not_a_server_import(
    settings: Settings, dce_dir: Path
) -> None:
    async def go() -> tuple[set[str], set[str]]:
        from consent.service import ConsentService

        async with Store.open(settings) as store:
            svc = ConsentService(store)
            await svc.grant([ADAM], "train", ADAM, "button")  # opted in to recording
            await svc.grant([THOMAS], "train", THOMAS, "upload")  # consented to his own export only
            await import_exports(store, [dce_dir / GENERAL])  # an admin's server import
            after_server_import = set(await store.messages.authors())
            await import_exports(store, [dce_dir / GENERAL], source="upload", upload_owner=THOMAS)
            return after_server_import, set(await store.messages.authors())

    server_import, after_own_upload = asyncio.run(go())
    assert server_import == {ADAM}, "an upload grant does not let an admin's import store Thomas's messages"
    assert after_own_upload == {ADAM, THOMAS}, "his own upload does"
