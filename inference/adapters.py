"""Loaded LoRA adapters: each file initialised once against the base model, kept in an LRU bounded by count and bytes."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference.errors import AdapterError

AdapterKey = tuple[tuple[str, int, float], ...]


@dataclass
class _Loaded:
    path: str
    mtime_ns: int
    handle: Any
    size: int
    pins: int = 0


@dataclass
class CacheStats:
    """Counters a test or the bench can read: what was loaded, evicted and freed."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    freed: list[str] = field(default_factory=list)


class AdapterCache:
    """LRU of adapters loaded into one model; pinned adapters (set on a context) are never freed."""

    def __init__(self, model: Any, max_count: int, budget_bytes: int) -> None:
        self._model = model
        self.max_count = max(1, max_count)
        self.budget_bytes = max(1, budget_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()
        # Erased adapter files: never loaded again, freed as soon as no context has them set. Concrete paths, not
        # the erasure's rule: a member who consents again and retrains gets a new folder that must load.
        self._erased: set[str] = set()
        self.stats = CacheStats()

    def acquire(self, key: AdapterKey) -> list[tuple[Any, float]]:
        """Load (or reuse) every adapter of `key` and pin it; returns (handle, scale) pairs."""
        got: list[tuple[Any, float]] = []
        try:
            for path, mtime, weight in key:
                got.append((self._acquire_one(path, mtime), weight))
        except BaseException:
            self.release(key[: len(got)])
            raise
        return got

    def release(self, key: AdapterKey) -> None:
        """Unpin the adapters of `key`; they stay loaded until evicted."""
        with self._lock:
            for path, mtime, _ in key:
                entry = self._entries.get((path, mtime))
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1
            self._evict()

    def loaded(self) -> list[str]:
        """Paths currently loaded, least recently used first."""
        with self._lock:
            return [e.path for e in self._entries.values()]

    def drop(self, doomed: Callable[[str], bool]) -> list[str]:
        """Free every unpinned adapter `doomed` names and refuse to load any again; returns the paths still held."""
        with self._lock:
            self._erased.update(e.path for e in self._entries.values() if doomed(e.path))
            for k, entry in list(self._entries.items()):
                if entry.path in self._erased and not entry.pins:
                    del self._entries[k]
                    self._free(entry)
            return [e.path for e in self._entries.values() if doomed(e.path)]

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size for e in self._entries.values())

    def close(self) -> None:
        """Free every adapter (the contexts using them must be gone or reset first)."""
        with self._lock:
            for entry in self._entries.values():
                self._free(entry)
            self._entries.clear()

    def _acquire_one(self, path: str, mtime: int) -> Any:
        import llama_cpp

        with self._lock:
            if path in self._erased:
                raise AdapterError(f"adapter {path} was erased")
            entry = self._entries.get((path, mtime))
            if entry is not None:
                self._entries.move_to_end((path, mtime))
                entry.pins += 1
                self.stats.hits += 1
                return entry.handle
        if mtime < 0 or not os.path.isfile(path):
            raise AdapterError(f"adapter file not found: {path}")
        size = os.path.getsize(path)
        if size > self.budget_bytes:
            raise AdapterError(
                f"adapter {path} needs {size / 2**20:.1f} MiB, over the adapter budget of "
                f"{self.budget_bytes / 2**20:.0f} MiB"
            )
        # Loading takes milliseconds; done outside the lock so other workers keep serving loaded adapters.
        handle = llama_cpp.llama_adapter_lora_init(self._model, os.fsencode(path))
        if not handle:
            raise AdapterError(f"cannot load adapter {path}: not a llama.cpp LoRA GGUF for this base model")
        with self._lock:
            entry = self._entries.get((path, mtime))
            if entry is not None:
                # Another worker loaded it meanwhile: keep theirs, free ours.
                llama_cpp.llama_adapter_lora_free(handle)
                self._entries.move_to_end((path, mtime))
            else:
                entry = _Loaded(path, mtime, handle, size)
                self._entries[(path, mtime)] = entry
                self.stats.loads += 1
            entry.pins += 1
            self._evict()
            return entry.handle

    def _evict(self) -> None:
        def over() -> bool:
            return (
                len(self._entries) > self.max_count
                or sum(e.size for e in self._entries.values()) > self.budget_bytes
            )

        for k in list(self._entries):
            entry = self._entries[k]
            if not entry.pins and entry.path in self._erased:
                del self._entries[k]
                self._free(entry)
                continue
            if not over():
                continue
            if entry.pins:
                continue
            del self._entries[k]
            self._free(entry)
            self.stats.evictions += 1

    def _free(self, entry: _Loaded) -> None:
        import llama_cpp

        if entry.handle:
            llama_cpp.llama_adapter_lora_free(entry.handle)
            entry.handle = None
            self.stats.freed.append(entry.path)


def as_arrays(pairs: Sequence[tuple[Any, float]]) -> tuple[Any, Any, int]:
    """ctypes arrays for `llama_set_adapters_lora`."""
    import ctypes

    import llama_cpp

    n = len(pairs)
    handles = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[h for h, _ in pairs])
    scales = (ctypes.c_float * max(n, 1))(*[w for _, w in pairs])
    return handles, scales, n
