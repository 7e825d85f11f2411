"""The base models one engine serves: each request's base read from its adapter's meta.json, loaded on demand,
checked against the hash recorded at training, and unloaded least recently used past a memory bound."""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings
from inference.adapters import AdapterCache, AdapterKey
from inference.errors import AdapterError, RequestError
from inference.runtime import BaseModel, KVStates, Session, default_threads


@dataclass(frozen=True)
class BaseRef:
    """Which base a request needs: the GGUF file, the sha256 recorded when its adapter was trained (None: unchecked)."""

    path: Path
    name: str = ""
    sha256: str | None = None
    adapter: str = ""  # the adapter that named this base, for the error a person reads


def recorded_base(adapter: str) -> tuple[str, str, str | None] | None:
    """(name, GGUF path, GGUF sha256 or None) from the meta.json beside `adapter`; None when it records no base."""
    meta_path = Path(adapter).parent / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{meta_path}: unreadable ({exc}); retrain or re-export the adapter") from None
    info = meta.get("base_model") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return None
    trained_on = str(info.get("path") or "")
    gguf = str(info.get("gguf") or (trained_on if trained_on.endswith(".gguf") else ""))
    if not gguf:
        return None
    # The recorded hash is of the file trained on: the GGUF's own only when training read the GGUF itself.
    sha = info.get("sha256") if trained_on == gguf else None
    return str(info.get("name") or ""), gguf, (str(sha) if sha else None)


def resolve_base(settings: Settings, default: Path, adapters: Sequence[tuple[str, float]]) -> BaseRef:
    """The base a request's adapters were trained on (no adapters, or none recorded: the engine's default base)."""
    from models.catalog import Catalog

    found: list[BaseRef] = []
    for path, _ in adapters:
        rec = recorded_base(path)
        if rec is None:
            found.append(BaseRef(default, adapter=path))
            continue
        name, gguf, sha = rec
        target = Path(gguf)
        if not target.is_file() or sha is None:
            # A moved home or a base trained from HF weights: the catalog knows the base by name.
            for model in Catalog(settings).bases():
                if model.name == name:
                    if not target.is_file():
                        target = Path(model.path)
                    sha = sha or model.sha256
                    break
        if not target.is_file():
            raise AdapterError(
                f"the persona's base model {name or gguf!r} is not on this machine ({gguf}); "
                "add it with `doppel personas add-base` or retrain the persona"
            )
        found.append(BaseRef(target.resolve(), name, sha, path))
    if not found:
        return BaseRef(default)
    if len({ref.path for ref in found}) > 1:
        raise RequestError("a blend may only mix adapters trained on the same base model")
    return found[0]


@dataclass
class LoadedBase:
    """One base in memory with what belongs to it: its adapters, its saved KV states, one session per worker."""

    base: BaseModel
    adapters: AdapterCache
    states: KVStates
    size: int
    sha256: str | None = None
    sessions: dict[int, Session] = field(default_factory=dict)
    pins: int = 0

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()
        self.adapters.close()
        self.states.clear()
        self.base.close()


class BasePool:
    """The loaded bases, LRU, bounded by `inference.base_budget_mb` of GGUF bytes (the bases in use always stay)."""

    def __init__(self, settings: Settings, default: Path) -> None:
        self.settings = settings
        self.cfg = settings.inference
        self.default = Path(default).expanduser().resolve()
        self.budget_bytes = max(1, self.cfg.base_budget_mb) * 2**20
        self._lock = threading.Lock()
        self._loaded: OrderedDict[Path, LoadedBase] = OrderedDict()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.loads = 0
        self.unloads = 0

    def resolve(self, adapters: Sequence[tuple[str, float]]) -> BaseRef:
        return resolve_base(self.settings, self.default, adapters)

    def loaded(self) -> list[str]:
        """Paths of the loaded bases, least recently used first."""
        with self._lock:
            return [str(p) for p in self._loaded]

    def get(self, path: Path) -> LoadedBase | None:
        with self._lock:
            return self._loaded.get(Path(path))

    def preload(self) -> LoadedBase:
        """Load the default base (at start: the first reply does not pay for it)."""
        with self._lock:
            return self._load(self.default)

    def acquire(self, ref: BaseRef, slot: int) -> Session:
        """Worker `slot`'s session on the base `ref` names (loaded and checked now if needed), pinned."""
        with self._lock:
            held = self._load(ref.path)
            if ref.sha256 is not None:
                if held.sha256 is None:
                    held.sha256 = self._sha(ref.path)
                if held.sha256 != ref.sha256:
                    raise AdapterError(
                        f"adapter {'/'.join(Path(ref.adapter).parts[-3:-1]) or ref.adapter} was trained on base "
                        f"{ref.name or '?'} (sha256 {ref.sha256[:12]}…), but {ref.path} is a different file "
                        f"(sha256 {held.sha256[:12]}…): restore that base or retrain the persona"
                    )
            session = held.sessions.get(slot)
            if session is None:
                threads = default_threads(self.cfg.n_threads)
                session = Session(held.base, held.adapters, held.states, self.cfg.n_ctx, threads)
                held.sessions[slot] = session
            held.pins += 1
            self._loaded.move_to_end(ref.path)
            self._evict()
            return session

    def release(self, path: Path) -> None:
        with self._lock:
            held = self._loaded.get(path)
            if held is not None and held.pins > 0:
                held.pins -= 1
            self._evict()

    def forget(self) -> None:
        """Drop every saved KV state and make every session start clean (an erased member may be quoted)."""
        with self._lock:
            for held in self._loaded.values():
                held.states.clear()
                for session in held.sessions.values():
                    session.flush_requested = True

    def held(self) -> list[LoadedBase]:
        """The loaded bases (a snapshot)."""
        with self._lock:
            return list(self._loaded.values())

    def close(self) -> None:
        with self._lock:
            for held in self._loaded.values():
                held.close()
            self._loaded.clear()

    def _load(self, path: Path) -> LoadedBase:
        from models.catalog import template_for_path

        held = self._loaded.get(path)
        if held is not None:
            self._loaded.move_to_end(path)
            return held
        # The template chosen for this GGUF at add-base, if any: the one its adapters were trained with.
        base = BaseModel(path, *template_for_path(self.settings, path))
        adapters = AdapterCache(base.model.model, self.cfg.max_adapters, self.cfg.adapter_budget_mb * 2**20)
        held = LoadedBase(base, adapters, KVStates(self.cfg.kv_states_kept), os.path.getsize(path))
        self._loaded[path] = held
        self.loads += 1
        return held  # evicting others waits until the caller has pinned this one

    def _evict(self) -> None:
        for path in list(self._loaded):
            if sum(h.size for h in self._loaded.values()) <= self.budget_bytes or len(self._loaded) <= 1:
                return
            held = self._loaded[path]
            if held.pins:
                continue
            del self._loaded[path]
            held.close()
            self.unloads += 1

    def _sha(self, path: Path) -> str:
        from models.catalog import file_sha256

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]


class WorkerSlot:
    """What one worker thread holds: its session on the base it served last (kept pinned until the next job)."""

    def __init__(self, pool: BasePool, index: int) -> None:
        self.pool = pool
        self.index = index
        # Held by the worker while it serves; erasure takes it to reset this slot's contexts between replies.
        self.lock = threading.Lock()
        self.session: Session | None = None
        self._path: Path | None = None

    @property
    def key(self) -> AdapterKey:
        """The adapter set on this worker's context (the scheduler groups requests by it)."""
        return self.session.key if self.session is not None else ()

    def bind(self, ref: BaseRef | None) -> Session:
        """The session to serve a job on base `ref` (None: the default base)."""
        ref = ref or BaseRef(self.pool.default)
        if self.session is not None and self._path == ref.path and ref.sha256 is None:
            return self.session
        session = self.pool.acquire(ref, self.index)
        if self._path is not None:
            self.pool.release(self._path)
        self.session, self._path = session, ref.path
        return session

    def unbind(self) -> None:
        if self._path is not None:
            self.pool.release(self._path)
        self.session, self._path = None, None
