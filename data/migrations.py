"""Schema migrations: an ordered list applied at start-up and recorded in `_migrations`. Append; never edit one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable

import aiosqlite

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def m001_initial(db: aiosqlite.Connection) -> None:
    """Members, consent, keys, messages, control plane (jobs, adapters, lineage), embeddings, feedback, guilds."""
    await run_script(
        db,
        """
        CREATE TABLE members (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            display_name TEXT NOT NULL,
            avatar_url TEXT,
            is_bot INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE consent (
            member_id TEXT NOT NULL,
            scope TEXT NOT NULL CHECK (scope IN ('train', 'chat')),
            granted_at REAL NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            PRIMARY KEY (member_id, scope)
        );
        CREATE TABLE consent_audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            member_id TEXT NOT NULL,
            action TEXT NOT NULL,
            scope TEXT,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX consent_audit_member ON consent_audit(member_id);
        CREATE TRIGGER consent_audit_no_update BEFORE UPDATE ON consent_audit
            BEGIN SELECT RAISE(ABORT, 'consent_audit is append-only'); END;
        CREATE TABLE member_keys (
            member_id TEXT PRIMARY KEY,
            wrapped BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            guild_id TEXT,
            channel_id TEXT NOT NULL,
            channel_name TEXT,
            author_id TEXT NOT NULL,
            author_name TEXT NOT NULL,
            created_at REAL NOT NULL,
            edited_at REAL,
            reply_to TEXT,
            reactions_json TEXT NOT NULL DEFAULT '{}',
            attachments INTEGER NOT NULL DEFAULT 0,
            source TEXT NOT NULL,
            content BLOB NOT NULL,
            stored_at REAL NOT NULL
        );
        CREATE INDEX messages_author ON messages(author_id, created_at);
        CREATE INDEX messages_channel ON messages(channel_id, created_at);
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            member_id TEXT,
            requested_by TEXT,
            source TEXT,
            mode TEXT NOT NULL DEFAULT 'sft',
            status TEXT NOT NULL DEFAULT 'queued',
            device TEXT,
            job_dir TEXT,
            config_json TEXT,
            progress_json TEXT,
            error TEXT,
            exit_detail TEXT,
            pid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            heartbeat_at REAL,
            adapter_id TEXT
        );
        CREATE INDEX jobs_member ON jobs(member_id, status);
        CREATE TABLE adapters (
            id TEXT PRIMARY KEY,
            member_id TEXT,
            base_model TEXT NOT NULL,
            base_sha256 TEXT,
            version INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'candidate',
            path TEXT,
            metrics_json TEXT,
            meta_json TEXT,
            created_at REAL NOT NULL,
            job_id TEXT
        );
        CREATE INDEX adapters_member ON adapters(member_id, status);
        CREATE TABLE adapter_lineage (
            adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
            member_id TEXT NOT NULL,
            PRIMARY KEY (adapter_id, member_id)
        );
        CREATE INDEX adapter_lineage_member ON adapter_lineage(member_id);
        CREATE TABLE embeddings (
            model TEXT NOT NULL,
            message_id TEXT NOT NULL,
            member_id TEXT NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (model, message_id)
        );
        CREATE INDEX embeddings_member ON embeddings(member_id, model);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            persona_member_id TEXT NOT NULL,
            rater_id TEXT NOT NULL,
            value INTEGER NOT NULL,
            adapter_id TEXT,
            guild_id TEXT,
            channel_id TEXT,
            message_id TEXT,
            payload BLOB,
            created_at REAL NOT NULL
        );
        CREATE INDEX feedback_persona ON feedback(persona_member_id);
        CREATE INDEX feedback_rater ON feedback(rater_id);
        CREATE TABLE guild_settings (
            guild_id TEXT PRIMARY KEY,
            recording_enabled INTEGER NOT NULL DEFAULT 0,
            acknowledged_by TEXT,
            acknowledged_at REAL,
            channel_allowlist_json TEXT NOT NULL DEFAULT '[]',
            persona_channels_json TEXT NOT NULL DEFAULT '[]'
        );
        """,
    )


async def m002_job_supervision(db: aiosqlite.Connection) -> None:
    """Training control plane: which supervisor owns a job, where it runs, cancel requests, resume; one active job per member."""
    await run_script(
        db,
        """
        ALTER TABLE jobs ADD COLUMN supervisor_pid INTEGER;
        ALTER TABLE jobs ADD COLUMN executor TEXT;
        ALTER TABLE jobs ADD COLUMN executor_ref TEXT;
        ALTER TABLE jobs ADD COLUMN cancel_requested_by TEXT;
        ALTER TABLE jobs ADD COLUMN resume INTEGER NOT NULL DEFAULT 0;
        CREATE UNIQUE INDEX jobs_one_active_per_member ON jobs(member_id)
            WHERE status IN ('queued', 'running', 'interrupted');
        CREATE INDEX jobs_device_status ON jobs(device, status, created_at);
        CREATE UNIQUE INDEX adapters_member_version ON adapters(coalesce(member_id, ''), version);
        """,
    )


async def m003_blind_tests(db: aiosqlite.Connection) -> None:
    """Blind tests (real message by id, no text) with one vote per member, and persona replies kept for feedback."""
    await run_script(
        db,
        """
        CREATE TABLE blind_tests (
            id TEXT PRIMARY KEY,
            member_id TEXT NOT NULL,
            adapter_id TEXT,
            guild_id TEXT,
            channel_id TEXT,
            real_message_id TEXT NOT NULL,
            real_label TEXT NOT NULL CHECK (real_label IN ('A', 'B')),
            created_at REAL NOT NULL
        );
        CREATE INDEX blind_tests_member ON blind_tests(member_id, adapter_id);
        CREATE TABLE blind_votes (
            test_id TEXT NOT NULL REFERENCES blind_tests(id) ON DELETE CASCADE,
            voter_id TEXT NOT NULL,
            picked_real INTEGER NOT NULL CHECK (picked_real IN (0, 1)),
            created_at REAL NOT NULL,
            PRIMARY KEY (test_id, voter_id)
        );
        CREATE INDEX blind_votes_voter ON blind_votes(voter_id);
        CREATE TABLE persona_replies (
            message_id TEXT PRIMARY KEY,
            persona_member_id TEXT NOT NULL,
            adapter_id TEXT,
            guild_id TEXT,
            channel_id TEXT,
            context_members_json TEXT NOT NULL DEFAULT '[]',
            payload BLOB,
            created_at REAL NOT NULL
        );
        CREATE INDEX persona_replies_persona ON persona_replies(persona_member_id);
        CREATE INDEX persona_replies_created ON persona_replies(created_at);
        """,
    )


async def m004_job_progress_message(db: aiosqlite.Connection) -> None:
    """Where a job's live progress message is, so a restarted bot keeps editing it."""
    await run_script(
        db,
        """
        ALTER TABLE jobs ADD COLUMN progress_channel_id TEXT;
        ALTER TABLE jobs ADD COLUMN progress_message_id TEXT;
        """,
    )


async def m005_join_in(db: aiosqlite.Connection) -> None:
    """Personas joining conversations: the `join` consent scope, admins' per-channel switch, members' silences."""
    # SQLite cannot widen a CHECK constraint in place: the consent table is rebuilt with the new scope allowed.
    await run_script(
        db,
        """
        CREATE TABLE consent_new (
            member_id TEXT NOT NULL,
            scope TEXT NOT NULL CHECK (scope IN ('train', 'chat', 'join')),
            granted_at REAL NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            PRIMARY KEY (member_id, scope)
        );
        INSERT INTO consent_new(member_id, scope, granted_at, actor, channel)
            SELECT member_id, scope, granted_at, actor, channel FROM consent;
        DROP TABLE consent;
        ALTER TABLE consent_new RENAME TO consent;
        CREATE TABLE join_channels (
            channel_id TEXT PRIMARY KEY,
            guild_id TEXT NOT NULL,
            level TEXT NOT NULL,
            set_by TEXT,
            set_at REAL NOT NULL
        );
        CREATE TABLE join_silences (
            member_id TEXT NOT NULL,
            channel_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (member_id, channel_id)
        );
        """,
    )


async def m006_persona_reply_mode(db: aiosqlite.Connection) -> None:
    """Which persona mode made each posted reply (adapter, adapter+retrieval, ...): what a server really serves."""
    await run_script(db, "ALTER TABLE persona_replies ADD COLUMN mode TEXT;")


async def m007_serving_places(db: aiosqlite.Connection) -> None:
    """Processes that serve personas, and erasure notices they acknowledge: forget reaches every one of them."""
    await run_script(
        db,
        """
        CREATE TABLE serving_places (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            label TEXT NOT NULL,
            pid INTEGER,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        );
        CREATE TABLE erasure_notices (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            member_id TEXT NOT NULL,
            adapters_json TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE erasure_acks (
            seq INTEGER NOT NULL REFERENCES erasure_notices(seq) ON DELETE CASCADE,
            place_id TEXT NOT NULL,
            held INTEGER NOT NULL,
            released INTEGER NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            acked_at REAL NOT NULL,
            PRIMARY KEY (seq, place_id)
        );
        """,
    )


async def m008_join_state(db: aiosqlite.Connection) -> None:
    """Joining-in rules that outlive a restart: budget spends (unprompted turns, conversations) and who last wrote
    where (a time, never text), so a restart neither refills budgets nor forgets that a member is in a channel."""
    await run_script(
        db,
        """
        CREATE TABLE join_spends (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            channel_id TEXT NOT NULL,
            member_id TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX join_spends_channel ON join_spends(kind, channel_id, at);
        CREATE INDEX join_spends_member ON join_spends(kind, member_id, at);
        CREATE TABLE join_seen (
            channel_id TEXT NOT NULL,
            member_id TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (channel_id, member_id)
        );
        """,
    )


MIGRATIONS: list[Migration] = [
    m001_initial,
    m002_job_supervision,
    m003_blind_tests,
    m004_job_progress_message,
    m005_join_in,
    m006_persona_reply_mode,
    m007_serving_places,
    m008_join_state,
]


async def run_script(db: aiosqlite.Connection, script: str) -> None:
    """Run statements one by one: `executescript` would COMMIT first and break the migration's transaction."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            await db.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]}")


async def apply(db: aiosqlite.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction (autocommit connection); returns names."""
    migrations = MIGRATIONS if migrations is None else migrations
    await db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    async with db.execute("SELECT name FROM _migrations") as cur:
        done = {row[0] for row in await cur.fetchall()}
    applied: list[str] = []
    for migration in migrations:
        name = migration.__name__
        if name in done:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            await migration(db)
            await db.execute("INSERT INTO _migrations(name, applied_at) VALUES (?, ?)", (name, time.time()))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
