"""The erasure cascade: coverage of every table and folder, jobs cancelled, adapters (also others') erased."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from consent.erasure import ErasureContext, ErasureParts, erasure_part, forget
from consent.errors import ErasureError
from consent.service import ConsentService
from core.settings import Settings
from data.records import Message
from data.store import Store
from doppel.erasure import erasure_parts
from jobs.table import JobTable
from models.errors import AdapterNotFoundError
from models.registry import Registry
from tests.helpers.rows import seed_adapter, seed_job

M, OTHER, THIRD = "300000000000000001", "300000000000000002", "300000000000000003"
# Tables that hold no member data (framework bookkeeping).
NO_MEMBER_DATA = {"_migrations", "sqlite_sequence"}
# Top-level entries of DOPPEL_HOME that hold no member data: the key file and the settings file. The database
# files are covered by the table check.
NO_MEMBER_FILES = {"master.key", "doppel.toml"}
# The parts the application runs, as its composition root hands them over: coverage is checked against these.
PARTS = erasure_parts()


def test_every_table_has_an_erasure_part(settings: Settings) -> None:
    async def go() -> set[str]:
        async with Store.open(settings) as store:
            return set(await store.tables())

    tables = asyncio.run(go())
    assert tables - NO_MEMBER_DATA - PARTS.tables() == set(), "tables with member data need an erasure part"


def _uncovered_home_entries(settings: Settings) -> set[str]:
    """Top-level folders (named by Settings or present) and files of DOPPEL_HOME that no erasure part covers."""
    # The top-level folder each `*_dir` lies in (the host share folder, for one, is inside the cache).
    named = {
        getattr(settings, n).relative_to(settings.home).parts[0]
        for n in dir(type(settings))
        if n.endswith("_dir")
    }
    present = {p.name for p in settings.home.iterdir() if p.is_dir()}
    db = settings.db_path.name
    files = {p.name for p in settings.home.iterdir() if p.is_file()} - {db, db + "-wal", db + "-shm"}
    return ((named | present) - PARTS.paths()) | (files - NO_MEMBER_FILES)


def test_every_home_folder_has_an_erasure_part(settings: Settings) -> None:
    asyncio.run(_use_store(settings))
    assert _uncovered_home_entries(settings) == set()


async def _use_store(settings: Settings) -> None:
    async with Store.open(settings) as store:
        await ConsentService(store).grant([M], "train", "t", "cli")


def test_a_new_uncovered_folder_is_detected(settings: Settings) -> None:
    asyncio.run(_use_store(settings))
    (settings.home / "brand_new_component").mkdir()
    (settings.home / "stray.bin").write_bytes(b"x")
    assert _uncovered_home_entries(settings) == {"brand_new_component", "stray.bin"}
    parts = [p.name for p in PARTS.in_order()]
    assert parts.index("member_key") < parts.index("messages") < parts.index("member")


def _spawn_job_process(job_dir: Path) -> subprocess.Popen[bytes]:
    """A stand-in trainer: erasure checks a pid's command line names the job's folder before it signals it."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(job_dir)], start_new_session=True
    )


def test_forget_cascades_through_jobs_adapters_files(settings: Settings) -> None:
    proc = _spawn_job_process(settings.home / "jobs" / "own")
    try:
        report = asyncio.run(_cascade(settings, proc.pid))
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    json.dumps(report)  # JSON-able
    assert report["parts"]["messages"] == 2
    assert report["parts"]["embeddings"] == 1 and report["parts"]["feedback"] == 2
    retired = {a["id"]: a for a in report["adapters_retired"]}
    assert len(retired) == 2
    assert sorted(a["own"] for a in retired.values()) == [False, True]
    assert len(report["jobs_cancelled"]) == 2
    assert report["files_deleted"] >= 6


async def _cascade(settings: Settings, pid: int) -> dict[str, object]:
    home = settings.home
    async with Store.open(settings) as store:
        await ConsentService(store).grant([M, OTHER, THIRD], "train,chat", "t", "cli")
        await store.messages.add_many(
            [
                Message("1", None, "c", "c", M, "m", 1.0, "a"),
                Message("2", None, "c", "c", M, "m", 2.0, "b"),
                Message("3", None, "c", "c", OTHER, "o", 3.0, "c"),
            ]
        )
        await store.embeddings.put(M, "mini", [("1", b"v")])
        await store.feedback.add(M, OTHER, 1, reply="r")
        await store.feedback.add(OTHER, M, -1)
        await store.feedback.add(OTHER, THIRD, 1)
        # A running job of the member (a live process), a queued job of another member whose dataset contains M,
        # and an unrelated finished job that must survive.
        jobs = {}
        for name, owner, status, contains in (
            ("own", M, "running", [M]),
            ("other", OTHER, "queued", [OTHER, M]),
            ("unrelated", THIRD, "succeeded", [THIRD]),
        ):
            job_dir = home / "jobs" / name
            (job_dir / "dataset").mkdir(parents=True)
            (job_dir / "dataset" / "train.jsonl").write_text('{"prompt": "x"}\n')
            (job_dir / "dataset" / "meta.json").write_text(json.dumps({"member": owner, "lineage": contains}))
            jobs[name] = await seed_job(
                store, owner, status, job_dir=str(job_dir), pid=pid if name == "own" else None
            )
        orphan = home / "jobs" / "orphan"
        (orphan / "dataset").mkdir(parents=True)
        (orphan / "dataset" / "meta.json").write_text(json.dumps({"member": THIRD, "contains": [THIRD, M]}))
        adapters = {}
        for name, owner, lineage in (("own", M, []), ("other", OTHER, [M]), ("unrelated", THIRD, [])):
            path = home / "adapters" / owner / name
            path.mkdir(parents=True)
            (path / "adapter.gguf").write_bytes(b"GGUF")
            adapters[name] = await seed_adapter(store, member_id=owner, lineage=lineage, path=str(path))
        (home / "cache").mkdir()
        (home / "cache" / f"kv-{M}.bin").write_bytes(b"state")
        (home / "cache" / f"kv-{OTHER}.bin").write_bytes(b"state")
        (home / "logs").mkdir(exist_ok=True)
        (home / "logs" / "doppel.log").write_text(f"line one\ntraining {M} started\nline three\n")
        await store.guilds.set("g", acknowledged_by=M, acknowledged_at=5.0)

        report = (await forget(store, settings, M, "operator", "cli", parts=PARTS)).to_dict()

        assert await store.messages.count(M) == 0 and await store.messages.count(OTHER) == 1
        assert not await store.keys.exists(M) and await store.members.get(M) is None
        assert await ConsentService(store).scopes(M) == set()
        assert (await ConsentService(store).audit(M))[-1]["action"] == "forgotten"
        table, registry = JobTable(store), Registry(store, settings)
        assert await table.get(jobs["own"].id) is None
        other_job = await table.get(jobs["other"].id)
        assert other_job is not None and other_job.status == "cancelled"
        assert other_job.error == "cancelled: a member's data was erased"
        unrelated_job = await table.get(jobs["unrelated"].id)
        assert unrelated_job is not None and unrelated_job.status == "succeeded"
        assert not (home / "jobs" / "own").exists() and not (home / "jobs" / "other").exists()
        assert not orphan.exists() and (home / "jobs" / "unrelated" / "dataset" / "train.jsonl").exists()
        with pytest.raises(AdapterNotFoundError):
            await registry.get(adapters["own"].id)
        assert (await registry.get(adapters["other"].id)).status == "erased"
        assert not Path(adapters["other"].path).exists() and not (home / "adapters" / M).exists()
        assert (await registry.get(adapters["unrelated"].id)).status == "active"
        assert Path(adapters["unrelated"].path).exists()
        assert await store.fetchall("SELECT * FROM adapter_lineage WHERE member_id = ?", (M,)) == []
        assert not (home / "cache" / f"kv-{M}.bin").exists() and (home / "cache" / f"kv-{OTHER}.bin").exists()
        assert (home / "logs" / "doppel.log").read_text() == "line one\nline three\n"
        assert (await store.guilds.get("g")).acknowledged_by is None
        assert [f["rater_id"] for f in await store.feedback.for_persona(OTHER)] == [THIRD]
    return report


def test_a_failing_part_does_not_stop_the_others(settings: Settings) -> None:
    @erasure_part("exploding_test_part", order=1)
    async def explode(ctx: ErasureContext) -> int:
        raise OSError("disk on fire")

    # The cascade runs what it is handed: the application's parts and, first, one that fails.
    probe = types.ModuleType("probe")
    probe.explode = explode  # type: ignore[attr-defined]
    parts = ErasureParts((*ErasureParts.of(probe).parts, *PARTS.parts), PARTS.exports)

    async def go() -> None:
        async with Store.open(settings) as store:
            await ConsentService(store).grant([M], "train", "t", "cli")
            await store.messages.add_many([Message("1", None, "c", "c", M, "m", 1.0, "a")])
            with pytest.raises(ErasureError, match="exploding_test_part"):
                await forget(store, settings, M, "t", "cli", parts=parts)
            assert await store.messages.count(M) == 0

    asyncio.run(go())


def test_parts_come_from_the_modules_handed_over() -> None:
    """Only the named modules' parts run: a module left out of the composition leaves its tables uncovered."""
    from consent import parts as consent_parts
    from jobs import erasure as jobs_erasure

    store_only = ErasureParts.of(consent_parts)
    assert "jobs" not in store_only.tables() and "member_keys" in store_only.tables()
    assert "jobs" not in dict(store_only.exports)
    both = ErasureParts.of(consent_parts, jobs_erasure, consent_parts)
    assert {"jobs", "member_keys"} <= both.tables() and "jobs" in dict(both.exports)
    assert PARTS.tables() >= both.tables() and {"adapters", "serving_places"} <= PARTS.tables()


def test_revoking_train_without_erasure_parts_is_refused_before_anything_changes(settings: Settings) -> None:
    from consent.errors import ConsentError

    async def go() -> None:
        async with Store.open(settings) as store:
            service = ConsentService(store)
            await service.grant([M], "train,chat", "t", "cli")
            with pytest.raises(ConsentError, match="erasure parts"):
                await service.revoke([M], "train", "t", "cli")
            assert await service.scopes(M) == {"train", "chat"}
            assert (await service.revoke([M], "chat", "t", "cli"))["revoked"] == {M: ["chat"]}

    asyncio.run(go())
