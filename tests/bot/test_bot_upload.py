"""`/doppel upload` of a real DiscordChatExporter export keeps only the uploader's messages; `/doppel mydata` DMs a file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

GENERAL = "dcef-Example_guild_-_Text_Channels_-_general__1012224565567721552_.json"
OWNER, OTHER_AUTHOR = 521486476985155645, 896568767994532880


def _attachment(name: str, size: int) -> dict[str, Any]:
    return {"attachments": {"77": {"id": "77", "filename": name, "size": size, "url": f"https://cdn.example/{name}",
                                   "proxy_url": f"https://cdn.example/{name}"}}}  # fmt: skip


def test_upload_stores_only_the_uploaders_messages(bot_world: Any, dce_dir: Path) -> None:
    raw = (dce_dir / GENERAL).read_bytes()
    own = sum(1 for m in json.loads(raw)["messages"] if m["author"]["id"] == str(OWNER))

    async def scenario() -> None:
        async with bot_world() as (h, services):
            # Another author in the file has train consent too: the upload must still not store their messages.
            await services.grant(str(OTHER_AUTHOR), ["train"], actor="test", channel="cli")
            h.fake.cdn = raw
            await h.command("doppel upload", OWNER, export=(11, "77"), resolved=_attachment("export.json", len(raw)))
            assert h.first_response_type() == 5
            stored = await services.store.messages.count(str(OWNER))
            assert 0 < stored <= own
            assert await services.store.messages.count(str(OTHER_AUTHOR)) == 0
            assert f"Imported **{stored}**" in h.sent_texts()[-1]
            audit = await services.consent.audit(str(OWNER))
            assert [(a["scope"], a["channel"]) for a in audit] == [("train", "upload")]
            # Uploading again stores nothing twice.
            await h.command("doppel upload", OWNER, export=(11, "77"), resolved=_attachment("export.json", len(raw)))
            assert await services.store.messages.count(str(OWNER)) == stored
            # mydata: the export reaches the member as a file in a DM.
            await h.command("doppel mydata", OWNER)
            dm = [c for c in h.fake.calls if c.path == "/channels/5555/messages"]
            assert dm and dm[-1].files == 1
            assert "Sent to your DMs" in h.sent_texts()[-1]

    asyncio.run(scenario())


def test_upload_rejects_what_is_not_an_export(bot_world: Any) -> None:
    async def scenario() -> None:
        async with bot_world() as (h, services):
            h.fake.cdn = b'{"hello": "world"}'
            await h.command("doppel upload", OWNER, export=(11, "77"), resolved=_attachment("x.json", 18))
            assert "not a DiscordChatExporter export" in h.sent_texts()[-1]
            await h.command("doppel upload", OWNER, export=(11, "77"), resolved=_attachment("x.txt", 18))
            assert ".json" in h.sent_texts()[-1]
            assert await services.store.messages.count() == 0

    asyncio.run(scenario())
