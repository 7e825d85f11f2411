"""Built exports: the shape DiscordChatExporter writes, and they import with replies and reactions kept."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from consent.service import ConsentService
from core.settings import Settings
from data.dce_import import import_exports
from data.records import Message
from data.store import Store
from doppel import dceformat as dce
from tests.helpers.dce_fixtures import real_exports

GUILD, CHANNEL, ALICE, BOB, BOT = (
    "900000000000000000",
    "900000000000000001",
    "900000000000000002",
    "900000000000000003",
    "900000000000000004",
)
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _export() -> dict:
    first = dce.message("910000000000000001", T0, "anyone around?", dce.author(ALICE, "alice"))
    reply = dce.message(
        "910000000000000002",
        T0 + timedelta(seconds=30),
        "yep",
        dce.author(BOB, "bob", "Bobby"),
        reply_to=(first["id"], CHANNEL, GUILD),
        reactions=[dce.reaction("😂", "joy", 2)],
    )
    bot = dce.message(
        "910000000000000003", T0 + timedelta(minutes=1), "beep", dce.author(BOT, "bot", is_bot=True)
    )
    head = dce.header(GUILD, "Guild", CHANNEL, "general", "Text Channels", T0)
    return dce.export(head, [first, reply, bot])


def test_built_exports_have_every_field_a_real_export_has() -> None:
    built = _export()
    paths = real_exports()
    assert len(paths) == 6  # DCE 2.47.1 and 2.48 captures, three channels each
    for path in paths:
        real = json.loads(path.read_text(encoding="utf-8"))
        assert set(real) <= set(built), path.name
        assert set(real["guild"]) <= set(built["guild"]), path.name
        assert set(real["channel"]) <= set(built["channel"]), path.name
        for msg in real["messages"]:
            assert set(msg) - {"reference"} <= set(built["messages"][0]), (path.name, msg["id"])
            assert set(msg["author"]) <= set(built["messages"][0]["author"]), (path.name, msg["id"])
            if "reference" in msg:
                assert set(msg["reference"]) <= set(built["messages"][1]["reference"]), (path.name, msg["id"])
        # DCE writes exportedAt with the exporting machine's offset; the builder writes one too.
        assert datetime.fromisoformat(real["exportedAt"]).utcoffset() == timedelta(hours=3), path.name
    assert datetime.fromisoformat(built["exportedAt"]).utcoffset() == timedelta(0)
    assert built["messages"][1]["type"] == "Reply" and built["messages"][0]["type"] == "Default"
    assert built["messageCount"] == 3


def test_built_exports_import_with_the_reply_and_reaction_kept(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(_export(), ensure_ascii=False), encoding="utf-8")

    async def scenario() -> tuple[dict, Message | None]:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([ALICE, BOB], ["train"], actor="test", channel="cli")
            total = (await import_exports(store, [path]))["total"]
            return total, await store.messages.get("910000000000000002")

    total, reply = asyncio.run(scenario())
    assert total["stored"] == 2 and total["skipped"].get("bot") == 1
    assert reply is not None
    assert (reply.reply_to, reply.reactions, reply.content) == ("910000000000000001", {"😂": 2}, "yep")
    assert reply.created_at == (T0 + timedelta(seconds=30)).timestamp()
