"""One host's CPU shared by serving and training: who generates now, and how many threads a trainer may take."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The trainer child's scheduling class. Serving is interactive and training is background: on Linux `idle`
# (SCHED_IDLE) lets any normal thread, a persona's llama.cpp prefill or decode, the retrieval encoder, the bot
# itself, preempt the trainer at once, while the trainer still takes every cycle nobody else wants.
PRIORITIES = ("idle", "low", "normal")
LOW_NICE = 19
SERVING_SUFFIX = ".serving"
BUSY_SUFFIX = ".busy"


def apply_priority(priority: str) -> str:
    """Lower this process (its threads started from now on inherit it); returns what was applied, in words."""
    if priority == "normal":
        return "normal"
    if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError:
            pass  # a container that forbids it: a low nice value is the next best thing
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), LOW_NICE))
        return f"nice {LOW_NICE}"
    except (OSError, AttributeError):
        return "normal"


async def in_background(fn: Callable[[], T]) -> T:
    """Run `fn` in a thread of its own at background priority; its OpenMP workers (torch) inherit it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if done.cancelled():
            return
        if ok:
            done.set_result(value)  # type: ignore[arg-type]
        else:
            done.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        # On Linux the scheduling class and nice value are per thread: this lowers only this one (and what it starts).
        apply_priority("idle")
        try:
            result: object = fn()
        except BaseException as exc:  # handed to the awaiting coroutine, never lost in the thread
            loop.call_soon_threadsafe(deliver, False, exc)
            return
        loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=work, name="doppel-background", daemon=True).start()
    return await done


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or `taskset` narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServingMarks:
    """Files in the share folder saying this process serves personas with N threads, and while it generates."""

    def __init__(self, folder: Path, threads: int) -> None:
        self.folder = folder
        self.threads = threads
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._active = 0

    @property
    def _serving(self) -> Path:
        return self.folder / f"{self._pid}{SERVING_SUFFIX}"

    @property
    def _busy(self) -> Path:
        return self.folder / f"{self._pid}{BUSY_SUFFIX}"

    def open(self) -> None:
        """Announce the engine (its thread count); a trainer reads it only while this process generates."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._serving.write_text(str(self.threads), encoding="utf-8")

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Mark this process busy for the duration (re-entrant across worker threads: counted)."""
        with self._lock:
            self._active += 1
            if self._active == 1:
                with contextlib.suppress(OSError):
                    self._busy.write_text(str(self.threads), encoding="utf-8")
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    with contextlib.suppress(OSError):
                        self._busy.unlink()

    def close(self) -> None:
        for path in (self._busy, self._serving):
            with contextlib.suppress(OSError):
                path.unlink()


@dataclass(frozen=True)
class Serving:
    """What the share folder says now: engines announced, and threads of those generating at this moment."""

    engines: int
    busy_threads: int


def _marks(folder: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """The marks with these suffixes of processes still alive; a dead process's marks are removed on the way."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        stem, dot, suffix = name.partition(".")
        if not stem.isdigit() or f"{dot}{suffix}" not in suffixes:
            continue
        path = folder / name
        if _alive(int(stem)):
            yield path
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def serving_now(folder: Path) -> Serving:
    """Read the share folder: engines announced, and the threads of those generating now."""
    engines = busy = 0
    for path in _marks(folder, (SERVING_SUFFIX, BUSY_SUFFIX)):
        try:
            threads = int(path.read_text(encoding="utf-8").strip() or 0)
        except (OSError, ValueError):
            continue
        if path.name.endswith(SERVING_SUFFIX):
            engines += 1
        else:
            busy += max(1, threads)
    return Serving(engines, busy)


def generating_now(folder: Path) -> bool:
    """Whether a live process on this host is making a persona reply (cheaper than `serving_now`: no reads)."""
    return next(_marks(folder, (BUSY_SUFFIX,)), None) is not None


class ServingPause:
    """Lets a trainer step aside between two layers while a persona reply is being made on this host.

    A lower scheduling class is not enough (measured, BENCHMARKS.md: a single SCHED_IDLE training thread still cut
    llama.cpp's decode from ~100 to ~15-20 tokens/s on 2 cores): a trainer thread that is merely runnable keeps the
    engine's threads from spreading over the cores. Sleeping is what frees them.
    """

    def __init__(
        self,
        folder: Path,
        *,
        check_every_s: float = 0.005,
        max_wait_s: float = 10.0,
        meter: CpuMeter | None = None,
    ) -> None:
        self.folder = folder
        # The governor's meter: what the engine uses while we sleep is no contention, so it is left out there.
        self.meter = meter
        self.check_every_s = check_every_s
        # A server that never stops talking must not starve the job: after this long it takes a layer's turn.
        self.max_wait_s = max_wait_s
        self.paused_s = 0.0
        self.pauses = 0
        self._checked = 0.0

    def wait(self, until: Callable[[], bool] | None = None) -> None:
        """Return at once when nobody generates (checked at most every `check_every_s`), else sleep until done.

        `until`: a sleep also ends as soon as it returns True (a job told to stop must not sleep out a reply).
        """
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        self._checked = now
        if not generating_now(self.folder):
            return
        self.pauses += 1
        start = self.meter.sample() if self.meter is not None else None
        while (
            time.monotonic() - now < self.max_wait_s
            and generating_now(self.folder)
            and not (until is not None and until())
        ):
            time.sleep(0.004)
        self._checked = time.monotonic()
        self.paused_s += self._checked - now
        if self.meter is not None:
            self.meter.exclude(start, self.meter.sample())


class CpuMeter:
    """CPU time other processes used since the last reading, in cores (from /proc/stat and our own usage)."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float] | None = None
        # Others' CPU and the wall time of the stretches left out since the last reading (a trainer's pauses).
        self._left_out = (0.0, 0.0)

    @staticmethod
    def sample() -> tuple[float, float, float] | None:
        """(monotonic time, busy CPU seconds of the host, CPU seconds of this process), or None without /proc."""
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = float(os.sysconf("SC_CLK_TCK"))
        # user nice system idle iowait irq softirq steal: busy is everything but idle and iowait.
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz
        own = sum(os.times()[:2])
        return time.monotonic(), busy, own

    def exclude(
        self, start: tuple[float, float, float] | None, end: tuple[float, float, float] | None
    ) -> None:
        """Leave the stretch between two samples out of the next reading (others' CPU and its wall time)."""
        if start is None or end is None:
            return
        cpu, wall = self._left_out
        self._left_out = (cpu + (end[1] - start[1]) - (end[2] - start[2]), wall + end[0] - start[0])

    def others(self) -> float | None:
        """Cores of CPU other processes used since the last call, left-out stretches aside (None: cannot tell)."""
        now = self.sample()
        last, self._last = self._last, now
        left_cpu, left_wall = self._left_out
        self._left_out = (0.0, 0.0)
        if now is None or last is None:
            return None
        wall = now[0] - last[0] - left_wall
        if wall < 0.05:
            return None
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2]) - left_cpu) / wall)


def encoder_threads(cores: int, llama_threads: int) -> int:
    """Torch threads for an encoder in a process that also runs llama.cpp: the cores llama.cpp leaves, at least one.

    Both run their thread pools on one libgomp in that process, and once libgomp manages more threads than there
    are cores it cuts every spin-wait to 100 iterations: llama.cpp's threads then sleep at each of the hundreds of
    barriers a token takes, and decode halves (76 -> 36 tokens/s on 2 cores after one 2-thread encode).
    """
    return max(1, cores - llama_threads)


def trainer_threads(cores: int, ceiling: int, busy_serving: int, others: float | None) -> int:
    """Threads for a trainer: the cores nobody else uses now, never fewer than one, never more than `ceiling`."""
    want = min(ceiling, cores) if ceiling > 0 else cores
    taken = float(busy_serving)
    if others is not None:
        # Two threads on one free core wait for each other at every barrier: fewer threads that all run go faster.
        taken = max(taken, others)
    return max(1, min(want, cores - int(taken + 0.5)))


class ThreadGovernor:
    """Chooses a trainer's thread count before each step from the share folder and the host's load."""

    def __init__(self, folder: Path | None, ceiling: int = 0, *, adapt: bool = True) -> None:
        self.folder = folder
        self.cores = usable_cores()
        self.ceiling = ceiling
        self.adapt = adapt
        self.meter = CpuMeter()
        self.current = trainer_threads(self.cores, ceiling, 0, None)

    def choose(self) -> int:
        """The thread count for the next step (cheap: one directory listing and two small /proc reads)."""
        if not self.adapt:
            return self.current
        busy = serving_now(self.folder).busy_threads if self.folder is not None else 0
        self.current = trainer_threads(self.cores, self.ceiling, busy, self.meter.others())
        return self.current
