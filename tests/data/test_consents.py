"""The consent reads below consent/: an upload-only `train` grant covers its owner's upload and nothing else."""

from __future__ import annotations

import asyncio

from consent.service import ConsentService
from core.settings import Settings
from data.consents import train_covering
from data.store import Store, connect_sync

LIVE, UPLOADER = "111111111111111111", "222222222222222222"


def test_an_upload_grant_covers_only_its_owners_upload_until_widened(settings: Settings) -> None:
    async def scenario() -> None:
        async with Store.open(settings) as store:
            consent, reads = ConsentService(store), store.consents
            await consent.grant([LIVE], "train,chat", LIVE, "button")
            await consent.grant([UPLOADER], "train", UPLOADER, "upload")
            assert await reads.with_scope("train") == {LIVE, UPLOADER}
            assert await reads.with_scope("chat", [LIVE, UPLOADER]) == {LIVE}
            assert await reads.records_live(LIVE) and not await reads.records_live(UPLOADER)
            assert await reads.upload_only(UPLOADER) and not await reads.upload_only(LIVE)
            conn = connect_sync(settings)
            try:
                assert train_covering(conn, None) == {LIVE}  # a server import
                assert train_covering(conn, UPLOADER) == {LIVE, UPLOADER}  # the uploader's own export
                assert train_covering(conn, LIVE) == {LIVE}  # someone else's upload
            finally:
                conn.close()
            # Granted again through the panel, the upload grant widens to live recording.
            await consent.grant([UPLOADER], "train", UPLOADER, "button")
            assert await reads.records_live(UPLOADER) and not await reads.upload_only(UPLOADER)
            exported = await reads.of_member(UPLOADER)
            assert [row["channel"] for row in exported["consent"]] == ["button"]
            assert [(row["action"], row["channel"]) for row in exported["consent_audit"]] == [
                ("grant", "upload"),
                ("grant", "button"),
            ]

    asyncio.run(scenario())
