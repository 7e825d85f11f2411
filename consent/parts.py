"""The erasure parts of the foundation: jobs, adapters, embeddings, feedback, messages, key, files, consent, member."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from consent.erasure import ErasureContext, erasure_part

_META_KEYS = ("member", "member_id", "lineage", "contains", "members")


def _meta_mentions(meta_path: Path, member_id: str) -> bool:
    """Whether a meta.json names the member (as owner, in lineage, or anywhere in its data)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # Unreadable metadata: the folder may hold anyone's text; the raw bytes decide.
        try:
            return member_id.encode() in meta_path.read_bytes()
        except OSError:
            return False
    if not isinstance(meta, dict):
        return False
    for key in _META_KEYS:
        value = meta.get(key)
        if value == member_id or (isinstance(value, list) and member_id in [str(v) for v in value]):
            return True
    return False


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _remove(path: Path, ctx: ErasureContext) -> None:
    """Delete a file or folder under DOPPEL_HOME (never outside it), counting files."""
    if not path.exists() and not path.is_symlink():
        return
    if not _inside(path, ctx.settings.home):
        raise PermissionError(f"refusing to delete {path}: outside DOPPEL_HOME")
    if path.is_dir() and not path.is_symlink():
        ctx.files_deleted += sum(1 for p in path.rglob("*") if not p.is_dir())
        shutil.rmtree(path)
    else:
        ctx.files_deleted += 1
        path.unlink()


def _stop(pid: int) -> bool:
    """SIGTERM a job process (its process group when it leads one); True if it was alive."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pgid = os.getpgid(pid)
        # Only signal the group when the job leads it: a shared group could be our own process.
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@erasure_part("jobs", order=10, tables=("jobs",), paths=("jobs",))
async def erase_jobs(ctx: ErasureContext) -> dict[str, int]:
    """Cancel running jobs that involve the member, delete their folders (datasets hold plaintext), drop own rows."""
    store, m = ctx.store, ctx.member_id
    cancelled = folders = rows_deleted = 0
    seen_dirs: set[Path] = set()
    for job in await store.jobs.list():
        job_dir = Path(job["job_dir"]) if job.get("job_dir") else None
        own = job.get("member_id") == m
        mentioned = job_dir is not None and _meta_mentions(job_dir / "dataset" / "meta.json", m)
        if not (own or mentioned):
            continue
        if job["status"] in ("queued", "running", "interrupted"):
            if job.get("pid") and _stop(int(job["pid"])):
                cancelled += 1
            ctx.cancelled_jobs.append(job["id"])
            await store.jobs.update(
                job["id"],
                status="cancelled",
                error="cancelled: a member's data was erased",
                finished_at=time.time(),
            )
        if job_dir is not None and job_dir.exists():
            _remove(job_dir, ctx)
            folders += 1
        if job_dir is not None:
            seen_dirs.add(job_dir.resolve())
        if own:
            await store.jobs.delete(job["id"])
            rows_deleted += 1
    # Folders without a row (crashed supervisor, leftovers) still hold datasets.
    jobs_dir = ctx.settings.jobs_dir
    if jobs_dir.is_dir():
        for child in jobs_dir.iterdir():
            if child.resolve() in seen_dirs or not child.is_dir():
                continue
            if m in child.name or _meta_mentions(child / "dataset" / "meta.json", m):
                _remove(child, ctx)
                folders += 1
    return {"signalled": cancelled, "folders": folders, "rows_deleted": rows_deleted}


@erasure_part("adapters", order=20, tables=("adapters", "adapter_lineage"), paths=("adapters",))
async def erase_adapters(ctx: ErasureContext) -> dict[str, int]:
    """Delete the files of every adapter whose lineage includes the member (theirs and others'), mark them erased."""
    store, m = ctx.store, ctx.member_id
    for adapter in await store.adapters.touching(m):
        own = adapter.get("member_id") == m
        if adapter.get("path"):
            _remove(Path(adapter["path"]), ctx)
        ctx.retired_adapters.append(
            {
                "id": adapter["id"],
                "member_id": adapter.get("member_id"),
                "version": adapter.get("version"),
                "previous_status": adapter["status"],
                "own": own,
            }
        )
        if own:
            await store.adapters.delete(adapter["id"])
        else:
            # meta_json copies the deleted meta.json, lineage (this member's id) included: it goes with the files.
            await store.adapters.update(adapter["id"], status="erased", path=None, meta_json=None)
    async with store.write() as db:
        await db.execute("DELETE FROM adapter_lineage WHERE member_id = ?", (m,))
    root = ctx.settings.adapters_dir
    folders = 0
    if root.is_dir():
        _remove(root / m, ctx)
        # Published versions whose meta.json names the member but that the table no longer lists.
        for meta in root.glob("*/*/meta.json"):
            if _meta_mentions(meta, m):
                _remove(meta.parent, ctx)
                folders += 1
    return {"adapters": len(ctx.retired_adapters), "orphan_folders": folders}


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
            _remove(path, ctx)
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
