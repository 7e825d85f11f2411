"""kill -9 at random points during import, training and chat: the store and the adapters stay sound."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, bundled_base_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERATIONS = int(os.environ.get("DOPPEL_KILL9_ITERATIONS", "20"))
SEED = int(os.environ.get("DOPPEL_KILL9_SEED", "99"))
YES, YES2, NO, NO2 = "700000000000000001", "700000000000000002", "700000000000000003", "700000000000000004"


# -- shared checks ----------------------------------------------------------------------------------------------
def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DOPPEL_HOME": str(home), "DOPPEL_MASTER_KEY": "", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _settings(home: Path) -> Settings:
    env = {
        "DOPPEL_HOME": str(home),
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        "DOPPEL_TRAINING__CANCEL_GRACE_S": "3",
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
    }
    return Settings.load(env=env)


def _query(home: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(home / "doppel.sqlite3")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def assert_sound(home: Path, where: str) -> None:
    """Integrity ok, nothing stored without train consent, no half-written or temporary adapter folder."""
    assert _query(home, "PRAGMA integrity_check") == [("ok",)], where
    forbidden = _query(
        home,
        "SELECT DISTINCT author_id FROM messages WHERE author_id NOT IN "
        "(SELECT member_id FROM consent WHERE scope = 'train')",
    )
    assert forbidden == [], f"{where}: messages stored without train consent: {forbidden}"
    vectors = _query(
        home,
        "SELECT DISTINCT member_id FROM embeddings WHERE member_id NOT IN "
        "(SELECT member_id FROM consent WHERE scope = 'train')",
    )
    assert vectors == [], f"{where}: embeddings stored without train consent: {vectors}"
    for path, status in _query(home, "SELECT path, status FROM adapters WHERE status != 'erased'"):
        folder = Path(path)
        missing = [f for f in ("adapter.gguf", "meta.json") if not (folder / f).is_file()]
        assert not missing, f"{where}: {status} adapter {folder} is missing {missing}"
    adapters = home / "adapters"
    if adapters.is_dir():
        temps = [p for p in adapters.rglob("*") if p.is_dir() and (p.name.startswith(".") or "tmp" in p.name)]
        assert temps == [], f"{where}: temporary adapter folders left behind: {temps}"


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


# -- (a) import -------------------------------------------------------------------------------------------------
def _write_exports(folder: Path, files: int = 3, per_file: int = 2500) -> dict[str, set[str]]:
    """A generated community export in several files; returns, per file, the ids a consenting import stores."""
    folder.mkdir()
    rng = random.Random(5)
    authors = [(YES, "yes"), (YES2, "yes2"), (NO, "no"), (NO2, "no2")]
    stored: dict[str, set[str]] = {}
    for f in range(files):
        msgs = []
        for i in range(per_file):
            aid, name = rng.choice(authors)
            mid = str(800000000000000000 + f * per_file + i)
            text = " ".join(
                rng.choice(["hey", "lol", "the build", "tonight", "ok", "sure", "gg", "nah"])
                for _ in range(rng.randint(2, 14))
            )
            msgs.append(
                {
                    "id": mid,
                    "type": "Default",
                    "timestamp": f"2024-03-{1 + f:02d}T10:{i // 60 % 60:02d}:"
                    f"{i % 60:02d}.{i % 1000:03d}+02:00",
                    "content": text,
                    "author": {"id": aid, "name": name, "isBot": False},
                    "attachments": [],
                    "reactions": [],
                }
            )
        name = f"export-{f}.json"
        (folder / name).write_text(
            json.dumps(
                {"guild": {"id": "9"}, "channel": {"id": str(90 + f), "name": f"c{f}"}, "messages": msgs}
            ),
            encoding="utf-8",
        )
        stored[name] = {m["id"] for m in msgs if m["author"]["id"] in (YES, YES2)}
    return stored


def _template(root: Path, grant: dict[str, str], seed: Any = None) -> Path:
    """A DOPPEL_HOME with consent granted (and optionally seeded), closed cleanly, to copy per iteration."""
    from consent.service import ConsentService
    from data.store import Store

    home = root / "template"
    home.mkdir()
    settings = _settings(home)

    async def go() -> None:
        async with Store.open(settings) as store:
            svc = ConsentService(store)
            for member, scopes in grant.items():
                await svc.grant([member], scopes, "admin", "cli")
        if seed is not None:
            await seed(settings)

    asyncio.run(go())
    return home


def test_kill9_during_import(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    per_file = _write_exports(exports)
    template = _template(tmp_path, {YES: "train", YES2: "train"})
    rng = random.Random(SEED)
    cmd = [sys.executable, "-m", "doppel", "import", str(exports)]

    full = tmp_path / "full"
    shutil.copytree(template, full)
    started = time.monotonic()
    done = subprocess.run(cmd, env=_env(full), capture_output=True, text=True, timeout=300)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    everything = set().union(*per_file.values())
    assert {r[0] for r in _query(full, "SELECT id FROM messages")} == everything

    outcomes: dict[str, int] = {"none": 0, "partial": 0, "all": 0}
    for i in range(ITERATIONS):
        home = tmp_path / f"import-{i}"
        shutil.copytree(template, home)
        proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, took))
        _kill(proc)
        where = f"import iteration {i}"
        assert_sound(home, where)
        ids = {r[0] for r in _query(home, "SELECT id FROM messages")}
        # One transaction per file: each file is in whole or not at all.
        for name, wanted in per_file.items():
            assert ids & wanted in (set(), wanted), f"{where}: {name} is partly imported"
        outcomes["none" if not ids else "all" if ids == everything else "partial"] += 1
        # A restart completes the job: the import is idempotent.
        again = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, f"{where}: re-import after the kill failed: {again.stderr}"
        assert {r[0] for r in _query(home, "SELECT id FROM messages")} == everything, where
        shutil.rmtree(home)
    assert outcomes["all"] < ITERATIONS, f"every kill came after the import had finished: {outcomes}"


# -- (b) training -----------------------------------------------------------------------------------------------


def _job_rows(home: Path) -> list[tuple[Any, ...]]:
    try:
        return _query(home, "SELECT id, status, pid, job_dir FROM jobs")
    except sqlite3.OperationalError:  # locked for a moment by the writer
        return []


def test_kill9_during_training(tmp_path: Path, tiny_model: Any, fx: Any) -> None:
    from data.store import Store
    from jobs.supervisor import Supervisor

    template = _template(tmp_path, {}, seed=fx.seed_member)
    env = {
        "DOPPEL_HOME": "",
        "DOPPEL_TRAINING__HEARTBEAT_S": "0.5",
        "DOPPEL_TRAINING__CANCEL_GRACE_S": "3",
        "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
    }
    overrides = json.dumps(fx.tiny_overrides(tiny_model, max_steps=8, save_steps=2))
    rng = random.Random(SEED + 1)
    seen: dict[str, int] = {}
    for i in range(ITERATIONS):
        home = tmp_path / f"train-{i}"
        shutil.copytree(template, home)
        env["DOPPEL_HOME"] = str(home)
        proc = subprocess.Popen(
            [sys.executable, "-c", fx.SUPERVISOR_SCRIPT, json.dumps(env), overrides, fx.PERSONA_ID],
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        trainer_pid: int | None = None
        victim = "supervisor" if i % 2 == 0 else "trainer"
        try:
            if victim == "supervisor":
                time.sleep(rng.uniform(0.3, 6.0))
                _kill(proc)
            else:
                deadline = time.monotonic() + 60
                while trainer_pid is None and time.monotonic() < deadline and proc.poll() is None:
                    pids = [r[2] for r in _job_rows(home) if r[2]]
                    trainer_pid = pids[0] if pids else None
                    time.sleep(0.05)
                assert trainer_pid, (
                    f"training iteration {i}: the trainer never started: {proc.stderr.read()!r}"
                )
                time.sleep(rng.uniform(0.0, 5.0))
                try:
                    os.killpg(trainer_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it finished first
                proc.wait(timeout=120)  # the supervisor records the outcome and exits
        finally:
            _kill(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        rows = _job_rows(home)
        orphan = next((r[2] for r in rows if r[1] == "running" and r[2]), None)
        settings = _settings(home)

        async def restart(settings: Settings) -> list[Any]:
            async with Store.open(settings) as store:
                sup = Supervisor(store, settings)
                await sup.start()
                await sup.close()
                return await sup.jobs.recent()

        jobs = asyncio.run(restart(settings))
        where = f"training iteration {i} ({victim} killed)"
        stuck = [(j.id, j.status.value) for j in jobs if j.status.value in ("running", "queued")]
        assert stuck == [], f"{where}: jobs stuck after restart: {stuck}"
        for j in jobs:
            seen[j.status.value] = seen.get(j.status.value, 0) + 1
            if j.status.value in ("failed", "cancelled", "succeeded"):
                assert not Path(j.job_dir).exists(), (
                    f"{where}: a finished job kept its folder (dataset plaintext)"
                )
        if orphan is not None:
            # recover() sends SIGKILL after the grace period and returns; give the kernel a moment to deliver it.
            assert fx.process_gone(orphan, within=5.0), (
                f"{where}: the orphaned trainer {orphan} still runs after the restart"
            )
        assert_sound(home, where)
        shutil.rmtree(home, ignore_errors=True)
    assert len(seen) >= 2, f"the kills all landed in the same state: {seen}"


# -- (c) chat ---------------------------------------------------------------------------------------------------
async def _seed_chat(settings: Settings) -> None:
    from data.records import Member, Message
    from data.store import Store

    async with Store.open(settings) as store:
        await store.members.upsert(Member(YES, "yes", "Yessa"))
        texts = ["the build is broken again lol", "pizza tonight?", "gg everyone", "i will fix it tomorrow"]
        await store.messages.add_many(
            [
                Message(str(9100 + n), "9", "90", "general", YES, "yes", 1.7e9 + n, t)
                for n, t in enumerate(texts * 5)
            ]
        )


@pytest.mark.skipif(bundled_base_gguf() is None, reason="bundled SmolLM2 GGUF not installed")
def test_kill9_during_chat(tmp_path: Path) -> None:
    home = _template(tmp_path, {YES: "train,chat"}, seed=_seed_chat)
    env = _env(home, DOPPEL_INFERENCE__N_CTX="512", DOPPEL_INFERENCE__N_THREADS="1")
    rng = random.Random(SEED + 2)

    def chat(mode: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "doppel",
            "chat",
            YES,
            "--mode",
            mode,
            "--max-tokens",
            "400",
            "--temperature",
            "1.0",
            "--seed",
            str(rng.randrange(1000)),
            "--message",
            "tell me a long story",
        ]

    for i in range(ITERATIONS):
        # Every fifth run uses the retrieval persona, which writes embeddings to the store while it answers.
        mode = "retrieval" if i % 5 == 0 else "base"
        proc = subprocess.Popen(chat(mode), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            # Wait for the first streamed bytes so the kill lands mid-generation, not during start-up.
            assert proc.stdout is not None
            first = proc.stdout.read(1)
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        assert first, f"chat iteration {i}: no output before the kill"
        assert_sound(home, f"chat iteration {i} ({mode})")
    count = _query(home, f"SELECT COUNT(*) FROM embeddings WHERE member_id = '{YES}'")[0][0]
    assert count in (0, 20), f"embeddings partly written: {count}"
    done = subprocess.run(
        [*chat("retrieval")[:-6], "--max-tokens", "8", "--message", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
