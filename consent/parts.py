"""The erasure parts of the store's tables and the home's plain folders: key, embeddings, feedback, messages, cache,
logs, join-in silences, consent, member. Jobs and adapters are erased beside their owners (`jobs.erasure`, `models.erasure`)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from consent.erasure import ErasureContext, erasure_part, export_part

if TYPE_CHECKING:
    from data.store import Store


@erasure_part("member_key", order=5, tables=("member_keys",))
async def erase_key(ctx: ErasureContext) -> int:
    """Crypto-shred first: without the key every copy of the content (backups included) is unreadable."""
    return await ctx.store.keys.delete(ctx.member_id)


@erasure_part("embeddings", order=30, tables=("embeddings",))
async def erase_embeddings(ctx: ErasureContext) -> int:
    """Delete the member's vectors."""
    return await ctx.store.embeddings.delete_member(ctx.member_id)


@erasure_part("feedback", order=32, tables=("feedback",))
async def erase_feedback(ctx: ErasureContext) -> int:
    """Delete ratings of the member's persona and ratings the member gave."""
    return await ctx.store.feedback.delete_member(ctx.member_id)


@erasure_part("blind_tests", order=33, tables=("blind_tests", "blind_votes"))
async def erase_blind_tests(ctx: ErasureContext) -> dict[str, int]:
    """Delete blind tests of the member's persona (with their votes) and the votes the member cast."""
    return await ctx.store.blind_tests.delete_member(ctx.member_id)


@erasure_part("persona_replies", order=34, tables=("persona_replies",))
async def erase_persona_replies(ctx: ErasureContext) -> int:
    """Delete the member's remembered persona replies and those whose context quotes the member."""
    return await ctx.store.persona_replies.delete_member(ctx.member_id)


@erasure_part("join_silences", order=36, tables=("join_silences",))
async def erase_join_silences(ctx: ErasureContext) -> int:
    """Delete where the member silenced their persona (it cannot join in without them anyway)."""
    return await ctx.store.joins.delete_member(ctx.member_id)


@erasure_part("join_state", order=37, tables=("join_spends", "join_seen"))
async def erase_join_state(ctx: ErasureContext) -> dict[str, int]:
    """Delete the member's joining-in budget spends and when they last wrote where."""
    return await ctx.store.joins.delete_state(ctx.member_id)


@export_part("join_in")
async def export_join_in(store: Store, member_id: str) -> dict[str, Any]:
    """The member's silences and the channels they opened to personas joining in."""
    return await store.joins.for_member(member_id)


@erasure_part("messages", order=40, tables=("messages",))
async def erase_messages(ctx: ErasureContext) -> int:
    """Delete every stored message of the member."""
    return await ctx.store.messages.delete_member(ctx.member_id)


@erasure_part("cache", order=50, paths=("cache",))
async def erase_cache(ctx: ErasureContext) -> int:
    """Delete cache entries named after the member (components name per-member cache files with the member id)."""
    root = ctx.settings.cache_dir
    if not root.is_dir():
        return 0
    before = ctx.files_deleted
    for path in sorted(root.rglob(f"*{ctx.member_id}*"), key=lambda p: len(p.parts)):
        if path.exists():
            ctx.remove(path)
    return ctx.files_deleted - before


@erasure_part("logs", order=55, paths=("logs",), identity=True)
async def erase_logs(ctx: ErasureContext) -> int:
    """Drop log lines that name the member (logs never hold content, but ids tie a person to events)."""
    root = ctx.settings.logs_dir
    if not root.is_dir():
        return 0
    needle = ctx.member_id.encode()
    dropped = 0
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        with path.open("rb") as fh:
            if not any(needle in line for line in fh):
                continue
        tmp = path.with_name(path.name + ".erasing")
        with path.open("rb") as src, tmp.open("wb") as dst:
            for line in src:
                if needle in line:
                    dropped += 1
                else:
                    dst.write(line)
        os.replace(tmp, path)
    return dropped


@erasure_part("guild_settings", order=60, tables=("guild_settings",), identity=True)
async def erase_guild_mentions(ctx: ErasureContext) -> int:
    """Remove the member's id from guild acknowledgements."""
    return await ctx.store.guilds.forget_member(ctx.member_id)


@erasure_part("join_channels", order=61, tables=("join_channels",), identity=True)
async def erase_join_openers(ctx: ErasureContext) -> int:
    """Remove the member's id from the channels they opened to personas (the switch stays)."""
    return await ctx.store.joins.forget_member(ctx.member_id)


@erasure_part("consent", order=80, tables=("consent", "consent_audit"), identity=True)
async def erase_consent(ctx: ErasureContext) -> dict[str, Any]:
    """Drop current scopes; the append-only audit keeps one 'forgotten' line (who, how, when; no content)."""
    async with ctx.store.write() as db:
        cur = await db.execute("DELETE FROM consent WHERE member_id = ?", (ctx.member_id,))
        await db.execute(
            "INSERT INTO consent_audit(member_id, action, scope, actor, channel, at) VALUES (?, 'forgotten', NULL, ?, ?, ?)",
            (ctx.member_id, ctx.actor, ctx.channel, time.time()),
        )
        return {"scopes_removed": cur.rowcount}


@erasure_part("member", order=85, tables=("members",), identity=True)
async def erase_member(ctx: ErasureContext) -> int:
    """Delete the member's profile (name, display name, avatar)."""
    return await ctx.store.members.delete(ctx.member_id)
