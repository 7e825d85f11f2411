"""Raw bytes of every file under DOPPEL_HOME: no plaintext content ever; after forget no ciphertext and no key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from consent.erasure import forget
from consent.service import ConsentService
from core.settings import Settings
from data.dce_import import import_exports
from data.records import Message
from data.store import Store
from doppel.erasure import erasure_parts

CANARY = "zebra-canary-7f3e91 quokka"
SECRET_MEMBER, OTHER = "123456789012345678", "223456789012345678"


def _all_bytes(home: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}


def _export(path: Path) -> None:
    msgs = [
        {
            "id": str(9000 + i),
            "type": "Default",
            "timestamp": f"2024-02-01T10:00:{i:02d}.5+01:00",
            "content": f"{CANARY} number {i}",
            "author": {"id": SECRET_MEMBER, "name": "secretive", "isBot": False},
            "attachments": [],
            "reactions": [],
        }
        for i in range(40)
    ]
    msgs.append(
        {
            "id": "9999",
            "type": "Default",
            "timestamp": "2024-02-01T11:00:00+00:00",
            "content": "other member canary-free text",
            "author": {"id": OTHER, "name": "o", "isBot": False},
        }
    )
    path.write_text(json.dumps({"guild": {"id": "1"}, "channel": {"id": "2", "name": "c"}, "messages": msgs}))


def test_no_plaintext_on_disk_and_nothing_left_after_forget(settings: Settings, tmp_path: Path) -> None:
    export = tmp_path / "export.json"  # outside DOPPEL_HOME: the operator's input file
    _export(export)
    needle = CANARY.encode()

    async def fill() -> tuple[bytes, list[bytes]]:
        store = await Store.open(settings)
        await ConsentService(store).grant([SECRET_MEMBER, OTHER], "train", "t", "cli")
        result = await import_exports(store, [export])
        assert result["total"]["stored"] == 41
        await store.messages.add_many(
            [Message("7777", "1", "2", "c", SECRET_MEMBER, "s", 5.0, CANARY + " live")]
        )
        await store.messages.edit("9001", CANARY + " edited", 6.0)
        await store.embeddings.put(SECRET_MEMBER, "mini", [("9002", needle)])
        await store.feedback.add(SECRET_MEMBER, OTHER, 1, prompt="p", reply=CANARY)
        # Scan while the store is open: the WAL and shared-memory files exist now.
        files = _all_bytes(settings.home)
        assert any(p.name.endswith("-wal") for p in files)
        for path, data in files.items():
            assert needle not in data, f"plaintext canary in {path}"
        wrapped = (
            await store.fetchone("SELECT wrapped FROM member_keys WHERE member_id = ?", (SECRET_MEMBER,))
        )[0]
        blobs = [
            r[0]
            for r in await store.fetchall(
                "SELECT content FROM messages WHERE author_id = ?", (SECRET_MEMBER,)
            )
        ]
        assert (await store.messages.get("9001")).content == CANARY + " edited"
        await forget(store, settings, SECRET_MEMBER, "t", "cli", parts=erasure_parts())
        await store.close()
        return wrapped, blobs

    wrapped, blobs = asyncio.run(fill())
    files = _all_bytes(settings.home)
    everything = b"\n".join(files.values())
    assert needle not in everything
    assert wrapped not in everything, "the wrapped member key survived forget"
    for blob in blobs:
        assert blob[12:40] not in everything, "a ciphertext of the forgotten member survived"
    assert b"secretive" not in everything, "the forgotten member's name survived"

    async def check() -> None:
        async with Store.open(settings) as store:
            assert await store.messages.count(SECRET_MEMBER) == 0
            assert await store.messages.count(OTHER) == 1
            assert not await store.keys.exists(SECRET_MEMBER)

    asyncio.run(check())
