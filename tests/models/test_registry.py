"""Model registry: base models, atomic publishing, the evaluation gate, retire-but-keep, rollback."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.rows import seed_job


def _artifact(
    root: Path, name: str, *, member: str = "1001", active: bool = True, lineage: tuple[str, ...] = ()
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter.gguf").write_bytes(b"GGUF" + name.encode())
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    metrics = {
        "ppl_adapter": 10.0 if active else 30.0,
        "ppl_base": 20.0,
        "active": active,
        "gate_reason": "beats base" if active else "does not beat base",
    }
    meta = {
        "member": member,
        "lineage": [member, *lineage],
        "metrics": metrics,
        "base_model": {"name": "smollm2-135m", "sha256": "ab" * 32},
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_gate_follows_the_trainer_and_checks_end_of_turn() -> None:
    from models.registry import gate

    assert gate({"active": True, "gate_reason": "beats base"}) == (True, "beats base")
    assert gate({"ppl_adapter": 5.0, "ppl_base": 9.0})[0] is True
    assert gate({"ppl_adapter": 9.0, "ppl_base": 5.0})[0] is False
    assert gate({})[0] is False
    assert gate({"ppl_adapter": float("nan"), "ppl_base": 5.0}) == (
        False,
        "held-out perplexity is not finite",
    )
    assert gate({"active": True, "eos_rate": 0.1})[0] is False


def test_publish_versions_gate_retire_and_rollback(settings: Any, tmp_path: Path) -> None:
    from data.store import Store
    from models.errors import AdapterNotFoundError
    from models.registry import Registry

    async def go() -> None:
        async with Store.open(settings) as store:
            reg = Registry(store, settings)
            await seed_job(store, "1001", "running", id="j1")
            v1 = await reg.publish(_artifact(tmp_path, "a1", lineage=("2002",)), job_id="j1")
            assert (v1.version, v1.status) == (1, "active")
            assert v1.lineage == ["1001", "2002"]
            assert Path(v1.path) == settings.adapters_dir / "1001" / f"1-{v1.id}"
            assert v1.gguf_path.read_bytes() == b"GGUFa1"
            v2 = await reg.publish(_artifact(tmp_path, "a2", active=False))
            assert (v2.version, v2.status) == (2, "candidate"), (
                "a version that fails the gate stays a candidate"
            )
            assert (await reg.active("1001")).id == v1.id
            v3 = await reg.publish(_artifact(tmp_path, "a3"))
            assert v3.status == "active" and v3.meta["gate"]["promoted"] is True
            states = {v.version: v.status for v in await reg.list("1001")}
            assert states == {1: "retired", 2: "candidate", 3: "active"}
            assert Path(v1.path).is_dir(), "the retired version is kept on disk"
            back = await reg.activate("1001", 1)
            assert back.status == "active"
            assert {v.version: v.status for v in await reg.list("1001")} == {
                1: "active",
                2: "candidate",
                3: "retired",
            }
            assert (await reg.active("1001")).version == 1
            with pytest.raises(AdapterNotFoundError):
                await reg.activate("1001", 9)
            assert await reg.active("4242") is None

    run(go())
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_publish_is_all_or_nothing(settings: Any, tmp_path: Path) -> None:
    from data.store import Store
    from models.errors import ArtifactError
    from models.registry import Registry

    async def go() -> None:
        async with Store.open(settings) as store:
            reg = Registry(store, settings)
            broken = _artifact(tmp_path, "broken")
            (broken / "adapter.gguf").unlink()
            with pytest.raises(ArtifactError, match="missing adapter.gguf"):
                await reg.publish(broken)
            # A database failure after the copy: no row, and no folder left behind under adapters/.
            await store.db.execute(
                "CREATE TRIGGER fail_insert BEFORE INSERT ON adapters BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
            with pytest.raises(sqlite3.DatabaseError, match="disk full"):
                await reg.publish(_artifact(tmp_path, "ok"))
            assert await reg.list() == []
            leftovers = [p for p in (settings.adapters_dir / "1001").iterdir()]
            assert leftovers == []

    run(go())


def test_gguf_header_reader_matches_the_gguf_package() -> None:
    from core.ggufinfo import read_shape
    from core.settings import bundled_base_gguf

    path = bundled_base_gguf()
    if path is None:
        pytest.skip("bundled base model not installed")
    shape = read_shape(path)
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert shape.params == sum(int(t.n_elements) for t in reader.tensors)
    assert (shape.architecture, shape.layers, shape.hidden, shape.vocab) == ("llama", 30, 576, 49152)
    from core.ggufinfo import read_metadata

    meta = read_metadata(path, arrays=("tokenizer.ggml.tokens",))
    assert meta["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert meta["tokenizer.chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    assert read_metadata(path)["tokenizer.ggml.tokens"] == 49152  # not asked for: only its length


def test_sweep_removes_leftovers_of_dead_publishers_only(settings: Any) -> None:
    import os
    import subprocess
    import sys

    from models.registry import Registry

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    folder = settings.adapters_dir / "123"
    stale = folder / f".tmp-{dead_pid}-abc"
    live = folder / f".tmp-{os.getppid()}-def"  # a live process (our parent) may still be copying
    for d in (stale, live):
        d.mkdir(parents=True)
    removed = Registry(None, settings).sweep()
    assert removed == (stale,) and not stale.exists() and live.exists()


def test_an_erased_or_cancelled_job_publishes_nothing(settings: Any, tmp_path: Path) -> None:
    """The erasure cascade can cancel a job while its trainer finishes: the publish re-checks the job atomically."""
    from consent.erasure import forget
    from data.records import Member
    from data.store import Store
    from doppel.erasure import erasure_parts
    from models.errors import ArtifactError
    from models.registry import Registry

    async def go() -> None:
        async with Store.open(settings) as store:
            reg = Registry(store, settings)
            await store.members.upsert(Member("2002", "friend", "Friend"))
            await seed_job(store, "1001", "running", id="own")
            await seed_job(store, "3003", "cancelled", id="theirs")
            with pytest.raises(ArtifactError, match="job theirs is cancelled"):
                await reg.publish(_artifact(tmp_path, "c", member="3003"), job_id="theirs")
            # The owner is forgotten while the job runs: the cascade deletes the job row, then the trainer finishes.
            await forget(store, settings, "1001", actor="1001", channel="cli", parts=erasure_parts())
            with pytest.raises(ArtifactError, match="job own is gone"):
                await reg.publish(_artifact(tmp_path, "late", lineage=("2002",)), job_id="own")
            assert await reg.list() == []
            assert not any(p.name.startswith(".tmp-") for p in settings.adapters_dir.rglob("*"))

    run(go())


def test_servable_needs_an_active_adapter_with_its_gguf_and_persona_members_skip_multi(
    settings: Any, tmp_path: Path
) -> None:
    from data.store import Store
    from models.registry import Registry
    from tests.helpers.rows import seed_adapter

    async def go() -> None:
        async with Store.open(settings) as store:
            reg = Registry(store, settings)
            ready, missing = tmp_path / "ready", tmp_path / "missing"
            ready.mkdir()
            (ready / "adapter.gguf").write_bytes(b"GGUF")
            await seed_adapter(store, id="a1", member_id="1001", status="active", path=str(ready))
            await seed_adapter(store, id="a2", member_id="1002", status="active", path=str(missing))
            await seed_adapter(store, id="a3", member_id="1003", status="candidate", path=str(ready))
            await seed_adapter(store, id="a4", member_id=None, status="active", path=str(ready))
            await seed_adapter(store, id="a5", member_id="1004", status="retired", path=str(ready))
            found = await reg.servable("1001")
            assert found is not None and found.id == "a1" and found.gguf_path == ready / "adapter.gguf"
            assert await reg.servable("1002") is None  # active, but its GGUF file is gone
            assert await reg.servable("1003") is None and await reg.servable("9999") is None
            assert await reg.persona_members() == {"1001", "1002"}

    run(go())
