"""After `doppel forget`, a byte scan of every file under DOPPEL_HOME finds nothing of the member.

Goes beyond tests/data/test_at_rest.py (store rows only): a realistic home made through the CLI and the real
components (import, retrieval embeddings, training datasets in job folders, published adapters whose lineage
includes the member, a per-member cache file, logs), erased through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings, bundled_base_gguf, bundled_embedding_model
from jobs.table import JobTable
from tests.helpers.rows import seed_job

pytestmark = [
    pytest.mark.skipif(
        bundled_base_gguf() is None, reason="bundled SmolLM2 GGUF not installed (chat format)"
    ),
    pytest.mark.timeout(300),
]

SECRET, FRIEND, BYSTANDER = "314159265358979323", "271828182845904523", "161803398874989484"
CANARY = "narwhal-canary-e41b7"
NAME, NICK = "wombatina", "Wombat Queen"


def _export(path: Path) -> None:
    """A channel where the secret member and a friend talk (so the friend's examples quote the secret member)."""
    msgs = []
    for i in range(60):
        base = 1_000_000 + i * 10
        msgs.append(
            {
                "id": str(base),
                "type": "Default",
                "timestamp": f"2024-04-0{1 + i // 20}T{(i % 20):02d}:00:00+00:00",
                "content": f"{CANARY} question {i} from the secret one",
                "author": {"id": SECRET, "name": NAME, "nickname": NICK, "isBot": False},
            }
        )
        msgs.append(
            {
                "id": str(base + 1),
                "type": "Default",
                "timestamp": f"2024-04-0{1 + i // 20}T{(i % 20):02d}:00:30+00:00",
                "content": f"friendly answer number {i} haha",
                "author": {"id": FRIEND, "name": "fren", "isBot": False},
            }
        )
        msgs.append(
            {
                "id": str(base + 2),
                "type": "Default",
                "timestamp": f"2024-04-0{1 + i // 20}T{(i % 20):02d}:30:00+00:00",
                "content": f"bystander talks alone {i}",
                "author": {"id": BYSTANDER, "name": "by", "isBot": False},
            }
        )
    doc = {"guild": {"id": "42"}, "channel": {"id": "4242", "name": "general"}, "messages": msgs}
    path.write_text(json.dumps(doc), encoding="utf-8")


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOPPEL_HOME": str(home), "DOPPEL_MASTER_KEY": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "doppel", *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, (args, proc.stderr)
    return proc


def _adapter_folder(root: Path, member: str, lineage: list[str], persona_name: str) -> Path:
    """A complete adapter folder as the trainer writes it (weights are placeholders; the registry checks the files)."""
    root.mkdir(parents=True)
    (root / "adapter.gguf").write_bytes(b"GGUF" + os.urandom(256))
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}), encoding="utf-8")
    (root / "adapter_model.safetensors").write_bytes(os.urandom(128))
    meta = {
        "member": member,
        "persona_name": persona_name,
        "lineage": lineage,
        "base_name": "smollm2-135m",
        "metrics": {"ppl_base": 30.0, "ppl_adapter": 20.0},
    }
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


async def _populate(settings: Settings, staging: Path) -> dict[str, Any]:
    """Embeddings, job folders with datasets, adapters; returns the secret's sealed bytes to look for later."""
    from core.chatformat import ChatFormat, Utterance
    from data.crypto import job_key_for
    from data.store import Store
    from jobs.dataset import materialize
    from jobspec.jobdata import open_bytes
    from models.registry import Registry

    chat = ChatFormat.from_gguf(bundled_base_gguf())  # type: ignore[arg-type]
    async with Store.open(settings) as store:
        if bundled_embedding_model() is not None:
            from inference.retrieval import Retriever

            got = await Retriever(store, settings).examples(
                SECRET, [Utterance(FRIEND, "fren", "any questions?")], 2
            )
            assert got and all(CANARY in g for g in got)
            assert await store.embeddings.count(SECRET) == 60
        jobs = {}
        for member in (SECRET, FRIEND):
            job = await seed_job(store, member, "interrupted")
            job_dir = settings.jobs_dir / job.id
            await materialize(store, settings, member, job_dir, chat, "sft")
            await JobTable(store).update(job.id, job_dir=str(job_dir))
            jobs[member] = job_dir
        friend_meta = json.loads((jobs[FRIEND] / "dataset" / "meta.json").read_text(encoding="utf-8"))
        assert SECRET in friend_meta["lineage"], "the friend's examples quote the secret member"
        # The dataset files are sealed with the job's key: the canary is there once they are opened.
        key = job_key_for(settings, jobs[FRIEND])
        assert any(CANARY.encode() in open_bytes(p, key) for p in jobs[FRIEND].rglob("*.jsonl"))
        assert not any(CANARY.encode() in p.read_bytes() for p in jobs[FRIEND].rglob("*.jsonl")), (
            "sealed at rest"
        )
        registry = Registry(store, settings)
        own = await registry.publish(_adapter_folder(staging / "own", SECRET, [SECRET], NICK))
        friends = await registry.publish(
            _adapter_folder(staging / "friend", FRIEND, friend_meta["lineage"], "fren")
        )
        kept = await registry.publish(_adapter_folder(staging / "by", BYSTANDER, [BYSTANDER], "by"))
        # A component's per-member cache file (named with the member id, as the contract asks).
        settings.cache_dir.mkdir(exist_ok=True)
        (settings.cache_dir / f"retrieval-{SECRET}.bin").write_bytes(CANARY.encode() * 3)
        wrapped = (await store.fetchone("SELECT wrapped FROM member_keys WHERE member_id = ?", (SECRET,)))[0]
        sealed = [
            r[0] for r in await store.fetchall("SELECT content FROM messages WHERE author_id = ?", (SECRET,))
        ]
        sealed += [
            r[0] for r in await store.fetchall("SELECT vector FROM embeddings WHERE member_id = ?", (SECRET,))
        ]
        return {
            "wrapped": wrapped,
            "sealed": sealed,
            "jobs": jobs,
            "own": own,
            "friends": friends,
            "kept": kept,
        }


def _text_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    out = []
    for (table,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ):
        out += [(table, row[1]) for row in conn.execute(f"PRAGMA table_info('{table}')")]
    return out


def test_forget_leaves_no_byte_of_the_member_anywhere_under_home(doppel_home: Path, tmp_path: Path) -> None:
    export = tmp_path / "export.json"  # the operator's input, outside DOPPEL_HOME
    _export(export)
    _cli(doppel_home, "consent", "grant", SECRET, FRIEND, BYSTANDER, "--scope", "train,chat")
    _cli(doppel_home, "import", str(export))
    settings = Settings.load(env={"DOPPEL_HOME": str(doppel_home)})
    staging = tmp_path / "staging"
    found = asyncio.run(_populate(settings, staging))
    _cli(doppel_home, "export-data", SECRET, "-o", str(tmp_path / "secret-export.json"))
    before = {p: p.read_bytes() for p in doppel_home.rglob("*") if p.is_file()}
    assert any(NAME.encode() in b for b in before.values()), (
        "the scan must have something to find before forget"
    )
    assert Path(found["own"].path).is_dir() and Path(found["friends"].path).is_dir()

    report = json.loads(_cli(doppel_home, "--json", "forget", SECRET).stdout.strip().splitlines()[-1])
    assert not report["errors"]
    retired = {a["id"] for a in report["adapters_retired"]}
    assert retired == {found["own"].id, found["friends"].id}, "adapters trained on the member are erased"

    files = {p: p.read_bytes() for p in doppel_home.rglob("*") if p.is_file()}
    needles = {
        "canary": CANARY.encode(),
        "name": NAME.encode(),
        "nickname": NICK.encode(),
        "wrapped key": found["wrapped"],
    }
    needles.update({f"sealed blob {i}": blob[12:44] for i, blob in enumerate(found["sealed"])})
    for path, data in files.items():
        for what, needle in needles.items():
            assert needle not in data, f"{what} of the forgotten member survives in {path}"
        if path.name != settings.db_path.name:
            assert SECRET.encode() not in data, f"the forgotten member's id survives in {path}"
    for job_dir in found["jobs"].values():
        assert not job_dir.exists(), f"job folder {job_dir} (a dataset quoting the member) survived"
    assert not Path(found["own"].path).exists() and not Path(found["friends"].path).exists()
    assert (Path(found["kept"].path) / "adapter.gguf").is_file(), "an unrelated member's adapter was deleted"

    # Inside the database the id may stay in exactly one place: the audit line saying the member was forgotten.
    conn = sqlite3.connect(settings.db_path)
    try:
        hits = []
        for table, column in _text_columns(conn):
            n = conn.execute(
                f'SELECT COUNT(*) FROM "{table}" WHERE CAST("{column}" AS TEXT) LIKE ?', (f"%{SECRET}%",)
            ).fetchone()[0]
            if n:
                hits.append((table, column, n))
        audit = conn.execute(
            "SELECT action FROM consent_audit WHERE member_id = ? ORDER BY rowid", (SECRET,)
        ).fetchall()
        assert (
            conn.execute("SELECT COUNT(*) FROM messages WHERE author_id = ?", (FRIEND,)).fetchone()[0] == 60
        )
    finally:
        conn.close()
    assert hits == [("consent_audit", "member_id", len(audit))], hits
    assert audit[-1] == ("forgotten",)
