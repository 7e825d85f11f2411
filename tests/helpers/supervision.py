"""Shared by the control-plane tests (loaded by path: test folders are not packages)."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

PERSONA_ID = "1001"

# A supervisor in its own process (argv: settings env JSON, TrainConfig overrides JSON, member id), so a test can
# kill it mid-run; it prints the job id once the job is queued.
SUPERVISOR_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from core.settings import Settings
    from data.store import Store
    from jobs.supervisor import Supervisor

    async def main():
        settings = Settings.load(env=json.loads(sys.argv[1]))
        async with Store.open(settings) as store:
            sup = Supervisor(store, settings)
            await sup.start()
            job = await sup.submit(sys.argv[3], requested_by="admin", **json.loads(sys.argv[2]))
            print(job.id, flush=True)
            await sup.wait(job.id)
            await sup.close()

    asyncio.run(main())
    """
)
OTHERS = (("2002", "bo"), ("3003", "cy"))
QUESTIONS = [
    "anyone around for a game tonight?",
    "did you see the new build?",
    "the server is down again",
    "what are you all up to this weekend",
    "I think we should meet at 7pm",
    "check the logs first",
]
TOPICS = ["game", "build", "server", "logs", "weekend", "tomorrow", "box", "fox"]
FEELINGS = ["sooo good", "the best", "so cursed", "amazing", "wild", "soooo fun", "broken lol", "perfect"]


async def seed_member(settings: Any, member_id: str = PERSONA_ID, exchanges: int = 48) -> None:
    """A consenting member who answers the others in #general, one exchange an hour (so each is its own example)."""
    from consent.service import ConsentService
    from data.records import Member, Message
    from data.store import Store

    async with Store.open(settings) as store:
        await ConsentService(store).grant([member_id, *(o[0] for o in OTHERS)], "train,chat", "admin", "cli")
        await store.members.upsert(Member(member_id, "ada", "Ada"))
        for oid, name in OTHERS:
            await store.members.upsert(Member(oid, name, name.title()))
        messages = []
        t0 = 1_700_000_000.0
        for i in range(exchanges):
            oid, oname = OTHERS[i % 2]
            at = t0 + i * 3600
            messages.append(
                Message(
                    f"{member_id}{i:04d}q",
                    "g1",
                    "c1",
                    "general",
                    oid,
                    oname,
                    at,
                    QUESTIONS[i % len(QUESTIONS)],
                )
            )
            messages.append(
                Message(
                    f"{member_id}{i:04d}a",
                    "g1",
                    "c1",
                    "general",
                    member_id,
                    "ada",
                    at + 30,
                    f"omg yes!!! the {TOPICS[i % 8]} is {FEELINGS[(i // 8) % 8]} haha :)",
                )
            )
        await store.messages.add_many(messages)


def control_env(home: Path, **training: Any) -> dict[str, str]:
    """DOPPEL_* variables of a control-plane test: its home, a fast heartbeat, no disk reserve, [training] overrides."""
    env = {
        "DOPPEL_HOME": str(home),
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
    }
    env.update({f"DOPPEL_TRAINING__{k.upper()}": str(v) for k, v in training.items()})
    return env


def tiny_overrides(tiny_model: Any, **extra: Any) -> dict[str, Any]:
    """TrainConfig fields that train the tiny model in seconds on one thread."""
    cfg = {
        "base_model": str(tiny_model.hf_dir),
        "base_gguf": str(tiny_model.gguf_path),
        "base_name": "tiny",
        "max_steps": 6,
        "micro_batch_size": 4,
        "grad_accum": 1,
        "learning_rate": 5e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "save_steps": 3,
        "threads": 1,
        "max_length": 256,
        "eval_samples": 1,
        "eval_max_new_tokens": 8,
        "eval_max_examples": 8,
    }
    cfg.update(extra)
    return cfg


def integrity(settings: Any) -> str:
    """`PRAGMA integrity_check` of the store's database."""
    conn = sqlite3.connect(settings.db_path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def wait_for(predicate: Any, timeout: float = 120.0, interval: float = 0.1) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("condition not reached in time")


def adapter_versions(settings: Any) -> list[Path]:
    """Published version folders on disk."""
    root = settings.adapters_dir
    return (
        sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith("."))
        if root.exists()
        else []
    )


def process_gone(pid: int, within: float) -> bool:
    """Whether process `pid` exits (or is a zombie awaiting its parent) within `within` seconds."""
    import psutil

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def run_async(fn: Any) -> Any:
    """Run an async test body in a fresh event loop (the project does not use a pytest asyncio plugin)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
