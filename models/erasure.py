"""Erasure and export of adapters: every version whose lineage includes the member, its files and its rows."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consent.erasure import ErasureContext, erasure_part, export_part, meta_mentions
from models.registry import Registry

if TYPE_CHECKING:
    from data.store import Store


@erasure_part("adapters", order=20, tables=("adapters", "adapter_lineage"), paths=("adapters",))
async def erase_adapters(ctx: ErasureContext) -> dict[str, int]:
    """Delete the files of every adapter trained on the member (theirs and others'), then drop or mark the rows."""
    registry, m = Registry(ctx.store, ctx.settings), ctx.member_id
    for adapter in await registry.touching(m):
        own = adapter.member_id == m
        if adapter.path:
            ctx.remove(Path(adapter.path))
        ctx.retired_adapters.append(
            {
                "id": adapter.id,
                "member_id": adapter.member_id,
                "version": adapter.version,
                "previous_status": adapter.status,
                "own": own,
                "path": adapter.path,
            }
        )
        await registry.erase(adapter.id, drop_row=own)
    await registry.drop_lineage(m)
    root = ctx.settings.adapters_dir
    folders = 0
    if root.is_dir():
        ctx.remove(root / m)
        # Published versions whose meta.json names the member but that the table no longer lists.
        for meta in root.glob("*/*/meta.json"):
            if meta_mentions(meta, m):
                ctx.remove(meta.parent)
                folders += 1
    return {"adapters": len(ctx.retired_adapters), "orphan_folders": folders}


@export_part("adapters")
async def export_adapters(store: Store, member_id: str) -> list[dict[str, Any]]:
    """The member's adapter versions and those trained on their messages, each with its lineage and metrics."""
    return [asdict(version) for version in await Registry(store, store.settings).touching(member_id)]
