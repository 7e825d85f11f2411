"""The erasure cascade: every component that stores member data or writes files registers a part here."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consent.errors import ErasureError

if TYPE_CHECKING:
    from core.settings import Settings
    from data.store import Store

log = logging.getLogger(__name__)

# Modules whose import registers erasure parts: each part lives beside the data it erases (the job folders beside
# the jobs table's owner, the adapters beside the registry). Named, not imported: the parts of higher layers
# depend on this module, never the other way round. A component that stores member data adds its module here.
PART_MODULES: tuple[str, ...] = ("consent.parts", "jobs.erasure", "models.erasure", "inference.erasure")
_META_KEYS = ("member", "member_id", "lineage", "contains", "members")


@dataclass
class ErasureContext:
    """What a part receives; parts append what they retired or deleted."""

    store: Store
    settings: Settings
    member_id: str
    actor: str
    channel: str
    retired_adapters: list[dict[str, Any]] = field(default_factory=list)
    cancelled_jobs: list[str] = field(default_factory=list)
    files_deleted: int = 0
    # Each process serving personas, and whether it let go of what it held of the member (inference.erasure).
    serving: list[dict[str, Any]] = field(default_factory=list)

    def remove(self, path: Path) -> None:
        """Delete a file or folder under DOPPEL_HOME (never outside it), counting files."""
        if not path.exists() and not path.is_symlink():
            return
        try:
            path.resolve().relative_to(self.settings.home.resolve())
        except ValueError:
            raise PermissionError(f"refusing to delete {path}: outside DOPPEL_HOME") from None
        if path.is_dir() and not path.is_symlink():
            self.files_deleted += sum(1 for p in path.rglob("*") if not p.is_dir())
            shutil.rmtree(path)
        else:
            self.files_deleted += 1
            path.unlink()


def meta_mentions(meta_path: Path, member_id: str) -> bool:
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


PartFn = Callable[[ErasureContext], Awaitable[Any]]


@dataclass(frozen=True)
class ErasurePart:
    """One registered part of the cascade and what it covers."""

    name: str
    fn: PartFn
    order: int
    tables: tuple[str, ...]
    paths: tuple[str, ...]
    identity: bool


@dataclass
class ErasureReport:
    """What `forget` did: counts per part, adapters retired (the member's and other members'), files deleted."""

    member_id: str
    actor: str
    channel: str
    parts: dict[str, Any]
    adapters_retired: list[dict[str, Any]]
    jobs_cancelled: list[str]
    files_deleted: int
    serving: list[dict[str, Any]]
    errors: dict[str, str]
    duration_s: float
    identity_kept: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


ExportFn = Callable[["Store", str], Awaitable[Any]]


class _Registry:
    """Parts and export sections by name; filled at import time by the decorators (static wiring, not state)."""

    def __init__(self) -> None:
        self.parts: dict[str, ErasurePart] = {}
        self.exports: dict[str, ExportFn] = {}

    def add(self, part: ErasurePart) -> None:
        existing = self.parts.get(part.name)
        if existing is not None and existing.fn is not part.fn:
            raise ValueError(f"erasure part {part.name!r} registered twice")
        self.parts[part.name] = part


REGISTRY = _Registry()


def erasure_part(
    name: str,
    *,
    order: int = 50,
    tables: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    identity: bool = False,
) -> Callable[[PartFn], PartFn]:
    """Register `async def part(ctx) -> dict|int`; `tables`/`paths` say what it covers; identity parts run only on forget."""

    def register(fn: PartFn) -> PartFn:
        REGISTRY.add(ErasurePart(name, fn, order, tuple(tables), tuple(paths), identity))
        return fn

    return register


def export_part(name: str) -> Callable[[ExportFn], ExportFn]:
    """Register `async def section(store, member_id)`: what the member's data export holds under `name`."""

    def register(fn: ExportFn) -> ExportFn:
        existing = REGISTRY.exports.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"export section {name!r} registered twice")
        REGISTRY.exports[name] = fn
        return fn

    return register


def registered_exports() -> dict[str, ExportFn]:
    """Every export section of the part modules, by name."""
    for module in PART_MODULES:
        importlib.import_module(module)
    return dict(sorted(REGISTRY.exports.items()))


def registered_parts() -> list[ErasurePart]:
    """Every part, after importing the modules that register them, in run order."""
    for module in PART_MODULES:
        importlib.import_module(module)
    return sorted(REGISTRY.parts.values(), key=lambda p: (p.order, p.name))


def covered_tables() -> set[str]:
    """Tables some part erases from."""
    return {t for p in registered_parts() for t in p.tables}


def covered_paths() -> set[str]:
    """Top-level DOPPEL_HOME folders some part cleans."""
    return {t for p in registered_parts() for t in p.paths}


async def forget(
    store: Store, settings: Settings, member_id: str, actor: str, channel: str, *, keep_identity: bool = False
) -> ErasureReport:
    """Run every part for one member (all of them even if one fails), then truncate the WAL; raise if any failed."""
    from data.members import check_member_id

    member_id = check_member_id(member_id)
    ctx = ErasureContext(store, settings, member_id, actor, channel)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for part in registered_parts():
        if keep_identity and part.identity:
            continue
        try:
            results[part.name] = await part.fn(ctx)
        except Exception as exc:
            log.exception("erasure part %s failed for a member", part.name)
            errors[part.name] = f"{type(exc).__name__}: {exc}"
    # Deleted pages may still sit in the WAL; fold it in (secure_delete zeroes them) and truncate it.
    await store.checkpoint()
    report = ErasureReport(
        member_id=member_id,
        actor=actor,
        channel=channel,
        parts=results,
        adapters_retired=ctx.retired_adapters,
        jobs_cancelled=ctx.cancelled_jobs,
        files_deleted=ctx.files_deleted,
        serving=ctx.serving,
        errors=errors,
        duration_s=round(time.perf_counter() - started, 4),
        identity_kept=keep_identity,
    )
    if errors:
        raise ErasureError(f"erasure of {member_id} incomplete: failed part(s) {', '.join(sorted(errors))}")
    return report
