"""`/doppel upload`: a DiscordChatExporter export is checked, consent is asked with a button, only the uploader's
messages are kept, and a refused file changes nothing; `/doppel mydata` DMs a file."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.helpers.dce_fixtures import GENERAL, MAREN, TEO

# Maren uploads tests/fixtures/dce/handmade/general.json, in which Teo also writes.
OWNER, OTHER_AUTHOR = int(MAREN), int(TEO)


def _button(payload: dict[str, Any], action: str) -> str:
    """The custom id of the upload consent button for `action` (import, live, cancel) in a followup payload."""
    ids = [c["custom_id"] for row in payload["components"] for c in row["components"]]
    return next(i for i in ids if i.endswith(f":{action}"))


def _attachment(name: str, size: int) -> dict[str, Any]:
    return {
        "attachments": {
            "77": {
                "id": "77",
                "filename": name,
                "size": size,
                "url": f"https://cdn.example/{name}",
                "proxy_url": f"https://cdn.example/{name}",
            }
        }
    }


def test_upload_stores_only_the_uploaders_messages(bot_world: Any) -> None:
    raw = GENERAL.read_bytes()
    own = sum(1 for m in json.loads(raw)["messages"] if m["author"]["id"] == str(OWNER))
    assert own == 11

    async def scenario() -> None:
        async with bot_world() as (h, services):
            # Another author in the file has train consent too: the upload must still not store their messages.
            await services.consent.grant([str(OTHER_AUTHOR)], ["train"], actor="test", channel="cli")
            h.fake.cdn = raw
            await h.command(
                "doppel upload", OWNER, export=(11, "77"), resolved=_attachment("export.json", len(raw))
            )
            assert h.first_response_type() == 5
            # Nothing is stored or consented to until the member presses a button that says what it covers.
            assert await services.store.messages.count(str(OWNER)) == 0
            assert await services.consent.scopes(str(OWNER)) == set()
            ask = h.responses()[-1].payload
            assert (
                ask["flags"] == 64
                and "may train an AI persona" in ask["content"]
                and "does not record" in ask["content"]
            )
            await h.click(_button(ask, "import"), OWNER, ephemeral=True)
            stored = await services.store.messages.count(str(OWNER))
            # Of her 11: a pin notice, "Started a thread.", a sticker-only and two attachment-only ones are not text.
            assert stored == 6
            assert await services.store.messages.count(str(OTHER_AUTHOR)) == 0
            assert f"Imported **{stored}**" in h.sent_texts()[-1]
            audit = await services.consent.audit(str(OWNER))
            assert [(a["scope"], a["channel"]) for a in audit] == [("train", "upload")]
            # Uploading again stores nothing twice.
            await h.command(
                "doppel upload", OWNER, export=(11, "77"), resolved=_attachment("export.json", len(raw))
            )
            await h.click(_button(h.responses()[-1].payload, "import"), OWNER, ephemeral=True)
            assert await services.store.messages.count(str(OWNER)) == stored
            # mydata: the export reaches the member as a file in a DM.
            await h.command("doppel mydata", OWNER)
            dm = [c for c in h.fake.calls if c.path == "/channels/5555/messages"]
            assert dm and dm[-1].files == 1
            assert "Sent to your DMs" in h.sent_texts()[-1]

    asyncio.run(scenario())


def test_refused_uploads_leave_consent_audit_and_store_unchanged(bot_world: Any) -> None:
    """Issue 12 (1): an invalid or non-export file must not opt the member in, nor make live recording store them."""

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await services.update_guild(
                str(h.GUILD), recording=True, acknowledged_by="1", allowed_channels=[str(h.TEXT)]
            )
            for body, name, why in (
                (b"{not json", "x.json", "not valid JSON"),
                (b'{"hello": "world"}', "x.json", "not a DiscordChatExporter export"),
                (b"{}", "x.txt", ".json"),
            ):
                h.fake.cdn = body
                await h.command(
                    "doppel upload", OWNER, export=(11, "77"), resolved=_attachment(name, len(body))
                )
                refusal = h.responses()[-1].payload
                assert why in refusal["content"] and not refusal.get("components")
            assert await services.consent.scopes(str(OWNER)) == set()
            assert await services.consent.audit(str(OWNER)) == []
            await h.say(OWNER, "my next live message in a recorded channel")
            assert await services.store.messages.count() == 0

    asyncio.run(scenario())


def test_upload_consent_covers_the_export_not_live_messages_unless_chosen(bot_world: Any) -> None:
    raw = GENERAL.read_bytes()

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await services.update_guild(
                str(h.GUILD), recording=True, acknowledged_by="1", allowed_channels=[str(h.TEXT)]
            )
            h.fake.cdn = raw
            # Cancel: nothing imported, nothing consented.
            await h.command(
                "doppel upload", OWNER, export=(11, "77"), resolved=_attachment("e.json", len(raw))
            )
            await h.click(_button(h.responses()[-1].payload, "cancel"), OWNER, ephemeral=True)
            assert "Nothing was imported" in h.sent_texts()[-1]
            assert await services.consent.audit(str(OWNER)) == []
            # Import only: the export is stored, live messages are still not recorded.
            await h.command(
                "doppel upload", OWNER, export=(11, "77"), resolved=_attachment("e.json", len(raw))
            )
            await h.click(_button(h.responses()[-1].payload, "import"), OWNER, ephemeral=True)
            imported = await services.store.messages.count(str(OWNER))
            assert imported == 6 and "live messages are not recorded" in h.sent_texts()[-1]
            await h.say(OWNER, "live, not recorded")
            assert await services.store.messages.count(str(OWNER)) == imported
            await h.command("doppel consent", OWNER)
            assert "uploaded" in h.sent_texts()[-1] and "**not** recorded" in h.sent_texts()[-1]
            # Pressing Opt in to training afterwards widens the consent to live recording (audited as such).
            await h.click("doppel:consent:train", OWNER)
            await h.say(OWNER, "live, recorded now")
            assert await services.store.messages.count(str(OWNER)) == imported + 1
            audit = await services.consent.audit(str(OWNER))
            assert [(a["action"], a["scope"], a["channel"]) for a in audit] == [
                ("grant", "train", "upload"),
                ("grant", "train", "button"),
            ]

    asyncio.run(scenario())


def test_upload_with_live_recording_chosen_and_expired_choice(bot_world: Any) -> None:
    raw = GENERAL.read_bytes()

    async def scenario() -> None:
        async with bot_world() as (h, services):
            await services.update_guild(
                str(h.GUILD), recording=True, acknowledged_by="1", allowed_channels=[str(h.TEXT)]
            )
            h.fake.cdn = raw
            await h.command(
                "doppel upload", OWNER, export=(11, "77"), resolved=_attachment("e.json", len(raw))
            )
            ask = h.responses()[-1].payload
            await h.click(_button(ask, "live"), OTHER_AUTHOR, ephemeral=True)  # not the uploader's to press
            assert "not for you" in h.sent_texts()[-1]
            assert await services.consent.scopes(str(OTHER_AUTHOR)) == set()
            await h.click(_button(ask, "live"), OWNER, ephemeral=True)
            imported = await services.store.messages.count(str(OWNER))
            assert imported == 6 and "live messages in recorded channels too" in h.sent_texts()[-1]
            await h.say(OWNER, "live and recorded")
            assert await services.store.messages.count(str(OWNER)) == imported + 1
            # A second press (or one after a restart, when nothing waits any more) imports nothing and says so.
            await h.click(_button(ask, "import"), OWNER, ephemeral=True)
            assert "run `/doppel upload` again" in h.sent_texts()[-1]
            assert h.responses()[-1].payload["data"]["flags"] == 64

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
