"""Adapter registry: versioned persona adapters and their lineage (base models: `models.catalog`).

Adapters live in DOPPEL_HOME/adapters/<member>/<version>-<adapter id>/ (multi-persona adapters under `_multi`). A trained
artifact is copied into a temporary folder beside its final place and renamed into it, and the row, its lineage
and the status changes are one transaction, so a half-published version is never visible. The evaluation gate
(`gate`) decides whether a new version becomes active or stays a candidate; the active version it replaces is
retired but kept on disk, so `activate` can roll back to it.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from models.catalog import write_json_atomic
from models.errors import (
    AdapterNotFoundError,
    ArtifactError,
    RegistryError,
)

if TYPE_CHECKING:
    from data.database import Database

MULTI_DIR = "_multi"
REQUIRED_FILES = ("adapter.gguf", "meta.json")
# What a version whose GGUF conversion failed still has: the trained PEFT weights.
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "meta.json")
# The columns of `adapters`; the registry is the one reader and writer of that table and of `adapter_lineage`.
COLUMNS = (
    "id",
    "member_id",
    "base_model",
    "base_sha256",
    "version",
    "status",
    "path",
    "metrics_json",
    "meta_json",
    "created_at",
    "job_id",
)
# Below this share of generated samples that end with the end-of-turn token, the persona would "never stop".
MIN_EOS_RATE = 0.5


@dataclass
class AdapterVersion:
    """One published adapter version (a row of `adapters` plus its lineage)."""

    id: str
    member_id: str | None
    base_model: str
    base_sha256: str | None
    version: int
    status: str
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    job_id: str | None = None
    lineage: list[str] = field(default_factory=list)

    @property
    def gguf_path(self) -> Path:
        """The llama.cpp LoRA file the inference engine loads."""
        return Path(self.path) / "adapter.gguf"

    def summary(self) -> dict[str, Any]:
        """JSON-able view for `doppel personas --json` and the bot."""
        return {
            "id": self.id,
            "member_id": self.member_id,
            "base_model": self.base_model,
            "version": self.version,
            "status": self.status,
            "metrics": self.metrics,
            "created_at": self.created_at,
            "job_id": self.job_id,
            "path": self.path,
            "lineage": self.lineage,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any], lineage: list[str] | None = None) -> AdapterVersion:
        return cls(
            id=row["id"],
            member_id=row.get("member_id"),
            base_model=row.get("base_model") or "",
            base_sha256=row.get("base_sha256"),
            version=int(row["version"]),
            status=row["status"],
            path=row.get("path") or "",
            metrics=json.loads(row.get("metrics_json") or "{}"),
            meta=json.loads(row.get("meta_json") or "{}"),
            created_at=row.get("created_at") or 0.0,
            job_id=row.get("job_id"),
            lineage=lineage or [],
        )


def gate(metrics: dict[str, Any]) -> tuple[bool, str]:
    """The evaluation gate: (becomes active?, why). A version must beat the base model on held-out perplexity.

    The trainer already decides this in meta.json (`metrics.active` + `gate_reason`); the registry honours that
    decision, recomputes it when absent, and adds the end-of-turn check. A newer version that passes replaces the
    active one: versions are evaluated on different held-out windows, so their perplexities are not comparable.
    """
    eos = metrics.get("eos_rate")
    if isinstance(eos, (int, float)) and eos < MIN_EOS_RATE:
        return False, f"only {eos:.0%} of samples end their turn (needs {MIN_EOS_RATE:.0%})"
    if "active" in metrics:
        return bool(metrics["active"]), str(
            metrics.get("gate_reason") or "decided by the trainer's evaluation"
        )
    from jobspec.verdict import gate as perplexity_gate  # the one perplexity rule, shared with the trainer

    return perplexity_gate(metrics)


class Registry:
    """Adapter versions and their lineage (the one owner of `adapters`); base models are `models.catalog`'s."""

    def __init__(self, store: Database, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # -- adapters ---------------------------------------------------------------------------------------------
    async def _rows(
        self,
        where: str,
        params: tuple[Any, ...],
        *,
        order: str = "a.member_id, a.version",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[AdapterVersion]:
        # One query: each row's lineage comes along as a group_concat, not as one more query per row.
        cols = COLUMNS
        page = f" LIMIT {int(limit)} OFFSET {max(0, int(offset))}" if limit is not None else ""
        select = ", ".join(f"a.{c}" for c in cols)
        rows = await self.store.fetchall(
            f"SELECT {select}, (SELECT group_concat(member_id, ',') FROM "
            "(SELECT l.member_id FROM adapter_lineage l WHERE l.adapter_id = a.id ORDER BY l.member_id)) "
            f"FROM adapters a WHERE {where} ORDER BY {order}{page}",
            params,
        )
        out = []
        for row in rows:
            data = dict(zip(cols, row[:-1], strict=True))
            out.append(AdapterVersion.from_row(data, row[-1].split(",") if row[-1] else []))
        return out

    async def list(
        self,
        member_id: str | None = None,
        include_erased: bool = False,
        *,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[AdapterVersion]:
        """Adapter versions, by member then version; `limit`/`offset` page through a large server's list."""
        if limit is not None and limit < 0:
            raise RegistryError(f"limit must not be negative, got {limit}")
        where, params = ["1=1"], []
        if member_id is not None:
            where.append("a.member_id = ?")
            params.append(member_id)
        if not include_erased:
            where.append("a.status != 'erased'")
        return await self._rows(" AND ".join(where), tuple(params), limit=limit, offset=offset)

    async def count(self, member_id: str | None = None, include_erased: bool = False) -> int:
        """How many versions `list` would return without a limit."""
        where, params = ["1=1"], []
        if member_id is not None:
            where.append("member_id = ?")
            params.append(member_id)
        if not include_erased:
            where.append("status != 'erased'")
        row = await self.store.fetchone(
            f"SELECT COUNT(*) FROM adapters WHERE {' AND '.join(where)}", tuple(params)
        )
        return int(row[0])

    async def get(self, adapter_id: str) -> AdapterVersion:
        """One version by adapter id."""
        found = await self._rows("a.id = ?", (adapter_id,))
        if not found:
            raise AdapterNotFoundError(f"no adapter {adapter_id}")
        return found[0]

    async def active(self, member_id: str | None) -> AdapterVersion | None:
        """The member's active adapter (None for `member_id=None` means the multi-persona one)."""
        found = await self._rows("a.member_id IS ? AND a.status = 'active'", (member_id,))
        return found[-1] if found else None

    async def active_personas(
        self, member_id: str | None = None, *, limit: int | None = None
    ) -> builtins.list[AdapterVersion]:
        """Active member personas (multi-persona adapters excepted), newest first; the newest `limit` of them."""
        where, params = "a.status = 'active' AND a.member_id IS NOT NULL", tuple[str, ...]()
        if member_id is not None:
            where, params = where + " AND a.member_id = ?", (member_id,)
        return await self._rows(where, params, order="a.created_at DESC, a.member_id", limit=limit)

    async def servable(self, member_id: str) -> AdapterVersion | None:
        """The member's active adapter when its llama.cpp GGUF file is on disk (what the engine can load), else None."""
        active = await self.active(member_id)
        if active is None or not active.path or not active.gguf_path.exists():
            return None
        return active

    async def persona_members(self) -> set[str]:
        """Members with an active persona (multi-persona adapters excepted)."""
        rows = await self.store.fetchall(
            "SELECT DISTINCT member_id FROM adapters WHERE status = 'active' AND member_id IS NOT NULL"
        )
        return {str(r[0]) for r in rows}

    async def count_personas(self) -> int:
        """How many members have an active persona."""
        row = await self.store.fetchone(
            "SELECT COUNT(DISTINCT member_id) FROM adapters WHERE status = 'active' AND member_id IS NOT NULL"
        )
        return int(row[0]) if row else 0

    async def publish(
        self,
        artifact_dir: Path,
        *,
        job_id: str | None = None,
        member_id: str | None = None,
        evaluation_error: str | None = None,
        export_error: str | None = None,
    ) -> AdapterVersion:
        """Copy a trained adapter folder in as the member's next version; the gate decides active or candidate.

        `evaluation_error`: the trainer saved the adapter but its evaluation failed; it is kept as a candidate
        whose reason says so, until `record_evaluation` (from `doppel eval`) completes it. `export_error`: the
        same after a failed GGUF conversion (the folder holds the PEFT files only); `doppel eval` converts it
        (`record_export`) and evaluates it.
        """
        meta = _read_meta(artifact_dir, PEFT_FILES if export_error is not None else REQUIRED_FILES)
        member = member_id if member_id is not None else (meta.get("member") or meta.get("member_id") or None)
        metrics = dict(meta.get("metrics") or {})
        if export_error is not None:
            metrics = export_failed(metrics, export_error)
            meta = {**meta, "metrics": metrics}
        elif evaluation_error is not None:
            metrics = evaluation_failed(metrics, evaluation_error)
            meta = {**meta, "metrics": metrics}
        lineage = sorted({str(m) for m in meta.get("lineage") or []} | ({member} if member else set()))
        base_name = str(meta.get("base_name") or _base_field(meta, "name") or self.settings.model.base_name)
        base_sha = meta.get("base_sha256") or _base_field(meta, "sha256")
        folder = self.settings.adapters_dir / (member or MULTI_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets a later start tell a dead publisher's leftovers from a live one's copy.
        tmp = folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            shutil.copytree(artifact_dir, tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"could not copy the adapter from {artifact_dir}: {exc}") from None
        adapter_id = uuid.uuid4().hex[:16]
        final: Path | None = None
        try:
            async with self.store.write() as db:
                if job_id is not None:
                    # In the same write transaction as the insert: an erasure that cancelled (or deleted) the job
                    # while it finished can never be followed by an adapter trained on the erased member.
                    job = await (
                        await db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,))
                    ).fetchone()
                    if job is None or job[0] != "running":
                        state = "gone" if job is None else job[0]
                        raise ArtifactError(f"job {job_id} is {state}: its adapter is not published")
                row = await (
                    await db.execute(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE member_id IS ?", (member,)
                    )
                ).fetchone()
                assert row is not None  # an aggregate always returns one row
                version = int(row[0])
                promote, reason = gate(metrics)
                # The folder carries the version's own id, so no path is ever used twice: erasure drops rows and
                # versions count again from 1, and anything keyed by path (a server's --lora list, a client's
                # cache, a process still holding the erased file) must never take an erased adapter for a new one.
                final = folder / f"{version}-{adapter_id}"
                os.replace(tmp, final)
                if promote:
                    await db.execute(
                        "UPDATE adapters SET status = 'retired' WHERE member_id IS ? AND status = 'active'",
                        (member,),
                    )
                meta_out = {**meta, "gate": {"promoted": promote, "reason": reason}}
                await db.execute(
                    """INSERT INTO adapters (id, member_id, base_model, base_sha256, version, status, path,
                           metrics_json, meta_json, created_at, job_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        adapter_id,
                        member,
                        base_name,
                        base_sha,
                        version,
                        "active" if promote else "candidate",
                        str(final),
                        json.dumps(metrics),
                        json.dumps(meta_out, default=str),
                        time.time(),
                        job_id,
                    ),
                )
                await db.executemany(
                    "INSERT OR IGNORE INTO adapter_lineage (adapter_id, member_id) VALUES (?, ?)",
                    [(adapter_id, m) for m in lineage],
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if final is not None and final.exists() and not await self._known_path(final):
                shutil.rmtree(final, ignore_errors=True)
            raise
        return await self.get(adapter_id)

    async def record_export(
        self, adapter_id: str, gguf: Path, export: dict[str, Any] | None = None
    ) -> AdapterVersion:
        """Copy a late GGUF conversion into a version whose export failed (temp file + rename: never half there)."""
        version = await self.get(adapter_id)
        if version.status == "erased":
            raise RegistryError(f"adapter {adapter_id} was erased")
        if not gguf.is_file():
            raise ArtifactError(f"no GGUF at {gguf}")
        folder = Path(version.path)
        tmp = folder / f".adapter.gguf.{uuid.uuid4().hex}"
        try:
            shutil.copyfile(gguf, tmp)
            os.replace(tmp, folder / "adapter.gguf")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArtifactError(f"could not copy the converted GGUF into {folder}: {exc}") from None
        summary = {k: v for k, v in (export or {}).items() if k != "error"}
        write_json_atomic(folder / "meta.json", {**_read_meta(folder, PEFT_FILES), "export": summary})
        meta_out = {**version.meta, "export": summary}
        async with self.store.write() as db:
            await db.execute(
                "UPDATE adapters SET meta_json = ? WHERE id = ? AND status != 'erased'",
                (json.dumps(meta_out, default=str), adapter_id),
            )
        return await self.get(adapter_id)

    async def record_evaluation(self, adapter_id: str, metrics: dict[str, Any]) -> AdapterVersion:
        """Store a (re-)evaluation's metrics on a version; a candidate that now passes the gate becomes active.

        Only candidates are promoted: a retired version stays retired (the operator chose another), and an active
        one that now fails stays active until a newer version passes, as at publish time.
        """
        version = await self.get(adapter_id)
        if version.status == "erased":
            raise RegistryError(f"adapter {adapter_id} was erased")
        promote, reason = gate(metrics)
        meta_path = Path(version.path) / "meta.json"
        folder_meta = _read_meta(Path(version.path))
        write_json_atomic(meta_path, {**folder_meta, "metrics": metrics})
        meta_out = {**version.meta, "metrics": metrics, "gate": {"promoted": promote, "reason": reason}}
        async with self.store.write() as db:
            await db.execute(
                "UPDATE adapters SET metrics_json = ?, meta_json = ? WHERE id = ? AND status != 'erased'",
                (json.dumps(metrics), json.dumps(meta_out, default=str), adapter_id),
            )
            if promote and version.status == "candidate":
                await db.execute(
                    "UPDATE adapters SET status = 'retired' WHERE member_id IS ? AND status = 'active' AND id != ?",
                    (version.member_id, adapter_id),
                )
                await db.execute(
                    "UPDATE adapters SET status = 'active' WHERE id = ? AND status = 'candidate'",
                    (adapter_id,),
                )
        return await self.get(adapter_id)

    def sweep(self) -> tuple[Path, ...]:
        """Delete temp folders left by a publisher that died mid-copy (never visible as adapters, but on disk)."""
        import psutil

        removed = []
        for tmp in self.settings.adapters_dir.glob("*/.tmp-*"):
            pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
            if pid.isdigit() and psutil.pid_exists(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        return tuple(removed)

    async def _known_path(self, path: Path) -> bool:
        return await self.store.fetchone("SELECT 1 FROM adapters WHERE path = ?", (str(path),)) is not None

    async def activate(self, member_id: str | None, version: int) -> AdapterVersion:
        """Make an older (or candidate) version active again; the current active one is retired, not deleted."""
        found = await self._rows("a.member_id IS ? AND a.version = ?", (member_id, version))
        if not found:
            raise AdapterNotFoundError(f"member {member_id or '(multi)'} has no adapter version {version}")
        target = found[0]
        if target.status == "erased":
            raise RegistryError(f"version {version} was erased and cannot be activated")
        missing = [f for f in REQUIRED_FILES if not (Path(target.path) / f).exists()]
        if missing:
            raise ArtifactError(f"version {version} is missing {', '.join(missing)} on disk")
        async with self.store.write() as db:
            await db.execute(
                "UPDATE adapters SET status = 'retired' WHERE member_id IS ? AND status = 'active' AND id != ?",
                (member_id, target.id),
            )
            await db.execute(
                "UPDATE adapters SET status = 'active' WHERE id = ? AND status != 'erased'", (target.id,)
            )
        return await self.get(target.id)

    # -- erasure and export of a member (models.erasure, the member's data export) ----------------------------
    async def touching(self, member_id: str) -> builtins.list[AdapterVersion]:
        """Versions of the member and versions trained on their messages (lineage), erased ones included."""
        return await self._rows(
            "a.member_id = ? OR a.id IN (SELECT adapter_id FROM adapter_lineage WHERE member_id = ?)",
            (member_id, member_id),
        )

    async def erase(self, adapter_id: str, *, drop_row: bool) -> None:
        """After its files are deleted: drop the row (the member's own version) or keep it marked `erased`."""
        async with self.store.write() as db:
            if drop_row:
                await db.execute("DELETE FROM adapter_lineage WHERE adapter_id = ?", (adapter_id,))
                await db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
            else:
                # meta_json copies the deleted meta.json, lineage included: it goes with the files.
                await db.execute(
                    "UPDATE adapters SET status = 'erased', path = NULL, meta_json = NULL WHERE id = ?",
                    (adapter_id,),
                )

    async def drop_lineage(self, member_id: str) -> None:
        """Remove the member from every version's lineage (the versions themselves were erased first)."""
        async with self.store.write() as db:
            await db.execute("DELETE FROM adapter_lineage WHERE member_id = ?", (member_id,))


def evaluation_failed(metrics: dict[str, Any], why: str) -> dict[str, Any]:
    """Metrics of a trained adapter whose evaluation did not complete: never active, and the reason says why."""
    return {
        **{k: v for k, v in metrics.items() if k not in ("active", "gate_reason")},
        "evaluation": "failed",
        "evaluation_error": why,
        "active": False,
        "gate_reason": f"evaluation failed: {why}; run `doppel eval` to evaluate it again",
    }


def export_failed(metrics: dict[str, Any], why: str) -> dict[str, Any]:
    """Metrics of a trained adapter whose GGUF conversion failed: a candidate that cannot be served yet, and why."""
    return {
        **{k: v for k, v in metrics.items() if k not in ("active", "gate_reason")},
        "evaluation": "pending",
        "export": "failed",
        "export_error": why,
        "active": False,
        "gate_reason": f"export failed: {why}; run `doppel eval` to convert and evaluate it again",
    }


def needs_evaluation(metrics: dict[str, Any]) -> bool:
    """True for a version saved before an evaluation that failed or never finished."""
    return metrics.get("evaluation") in ("failed", "pending")


def _read_meta(artifact_dir: Path, required: tuple[str, ...] = REQUIRED_FILES) -> dict[str, Any]:
    if not artifact_dir.is_dir():
        raise ArtifactError(f"no adapter folder at {artifact_dir}")
    missing = [f for f in required if not (artifact_dir / f).is_file()]
    if missing:
        raise ArtifactError(f"{artifact_dir} is missing {', '.join(missing)}")
    try:
        meta = json.loads((artifact_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{artifact_dir / 'meta.json'}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{artifact_dir / 'meta.json'}: expected a JSON object")
    return meta


def _base_field(meta: dict[str, Any], key: str) -> Any:
    base = meta.get("base_model") or meta.get("base")
    return (
        base.get(key)
        if isinstance(base, dict)
        else (base if key == "name" and isinstance(base, str) else None)
    )
