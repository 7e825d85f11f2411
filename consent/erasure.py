"""The erasure cascade: every component that stores member data or writes files declares a part beside that data;
the composition root (`doppel.erasure`) hands the cascade the modules holding them."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from consent.errors import ErasureError

if TYPE_CHECKING:
    from core.settings import Settings
    from data.store import Store

log = logging.getLogger(__name__)

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
# The attributes the decorators leave on a function: what it is to the cascade, read by `ErasureParts.of`.
_PART_ATTR, _EXPORT_ATTR = "__erasure_part__", "__export_section__"


def erasure_part(
    name: str,
    *,
    order: int = 50,
    tables: tuple[str, ...] = (),
    paths: tuple[str, ...] = (),
    identity: bool = False,
) -> Callable[[PartFn], PartFn]:
    """Mark `async def part(ctx) -> dict|int` as a part; `tables`/`paths` say what it covers; identity parts run only on forget."""

    def mark(fn: PartFn) -> PartFn:
        setattr(fn, _PART_ATTR, ErasurePart(name, fn, order, tuple(tables), tuple(paths), identity))
        return fn

    return mark


def export_part(name: str) -> Callable[[ExportFn], ExportFn]:
    """Mark `async def section(store, member_id)` as what the member's data export holds under `name`."""

    def mark(fn: ExportFn) -> ExportFn:
        setattr(fn, _EXPORT_ATTR, name)
        return fn

    return mark


@dataclass(frozen=True)
class ErasureParts:
    """The parts `forget` runs and the sections the export holds: those of the modules the composition root names."""

    parts: tuple[ErasurePart, ...]
    exports: tuple[tuple[str, ExportFn], ...] = ()

    @classmethod
    def of(cls, *modules: ModuleType) -> ErasureParts:
        """Collect the marked parts and export sections of `modules` (a name marked twice is refused)."""
        parts: dict[str, ErasurePart] = {}
        exports: dict[str, ExportFn] = {}
        for module in modules:
            for value in vars(module).values():
                part = getattr(value, _PART_ATTR, None)
                if isinstance(part, ErasurePart):
                    if parts.setdefault(part.name, part).fn is not part.fn:
                        raise ValueError(f"erasure part {part.name!r} registered twice")
                section = getattr(value, _EXPORT_ATTR, None)
                if isinstance(section, str):
                    if exports.setdefault(section, value) is not value:
                        raise ValueError(f"export section {section!r} registered twice")
        return cls(tuple(parts.values()), tuple(sorted(exports.items())))

    def in_order(self) -> list[ErasurePart]:
        """The parts in run order."""
        return sorted(self.parts, key=lambda p: (p.order, p.name))

    def tables(self) -> set[str]:
        """Tables some part erases from."""
        return {t for p in self.parts for t in p.tables}

    def paths(self) -> set[str]:
        """Top-level DOPPEL_HOME folders some part cleans."""
        return {t for p in self.parts for t in p.paths}


async def forget(
    store: Store,
    settings: Settings,
    member_id: str,
    actor: str,
    channel: str,
    *,
    parts: ErasureParts,
    keep_identity: bool = False,
) -> ErasureReport:
    """Run every part for one member (all of them even if one fails), then truncate the WAL; raise if any failed."""
    from data.members import check_member_id

    member_id = check_member_id(member_id)
    ctx = ErasureContext(store, settings, member_id, actor, channel)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for part in parts.in_order():
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
