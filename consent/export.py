"""A member's data export: the store's sections and the sections declared beside jobs and adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from data.export import member_export as store_sections

if TYPE_CHECKING:
    from consent.erasure import ErasureParts
    from data.store import Store


async def member_export(store: Store, member_id: str, parts: ErasureParts) -> dict[str, Any]:
    """Everything stored about one member, decrypted, as a JSON-able dict (what `doppel export` writes)."""
    data = await store_sections(store, member_id)
    for name, section in parts.exports:
        data[name] = await section(store, data["member_id"])
    return data
