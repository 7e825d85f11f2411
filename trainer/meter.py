"""What the trainer child measures of its own memory: peak RSS (and VRAM) per phase, and glibc's allocator settings.

The estimate it is compared with is `jobspec.memory`, which pre-flight reads too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobspec.memory import MIB

if TYPE_CHECKING:
    from core.ggufinfo import ModelShape
    from jobspec.config import TrainConfig


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0): each phase gets its own peak.
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# Allocations from this size up get pages of their own, returned to the OS when freed. glibc otherwise raises its
# mmap threshold to the largest block freed so far (up to 32 MiB), after which activations come from the heap, and
# a heap whose top is still in use keeps every freed page below it: the process grows by whatever the steps leave.
MMAP_THRESHOLD = 1 * MIB


def limit_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> None:
    """glibc malloc for a training process: two arenas, and large blocks mapped and unmapped (no dynamic threshold)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX: torch's worker threads share two arenas instead of 8 per core
        if mmap_threshold:
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD, fixed: no longer follows the largest free
    except (OSError, AttributeError):
        pass


def trim_allocator() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`), so the next phase starts from what is live."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PhaseMeter:
    """Peak RSS (and on CUDA peak allocated VRAM) of each phase of this process, in MiB.

    `enter(name)` closes the phase running now (its VmHWM since it began), returns freed heap to the OS, and resets
    the high-water mark, so each figure is what that phase alone needed at its worst, weights it shares included.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.vram: dict[str, float] = {}
        self.phase: str | None = None
        self.lifetime_kb = 0
        self.resets = False  # nothing is reset until the first phase begins

    def enter(self, phase: str | None) -> None:
        """Close the current phase and start `phase` (None: just close)."""
        hwm = _status_kb("VmHWM")
        self.lifetime_kb = max(self.lifetime_kb, hwm)
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), round(hwm / 1024, 1))
            cuda = _cuda()
            if cuda is not None:
                mb = round(cuda.max_memory_allocated() / MIB, 1)
                self.vram[self.phase] = max(self.vram.get(self.phase, 0.0), mb)
        gc_collect()
        trim_allocator()
        self.resets = _reset_peak()
        cuda = _cuda()
        if cuda is not None:
            cuda.empty_cache()
            cuda.reset_peak_memory_stats()
        self.phase = phase

    def report(self) -> dict[str, Any]:
        """Per-phase peaks so far (the running phase included) and the process's lifetime peak, in MiB."""
        hwm = _status_kb("VmHWM")
        peaks = dict(self.peaks)
        if self.phase is not None:
            peaks[self.phase] = max(peaks.get(self.phase, 0.0), round(hwm / 1024, 1))
        out: dict[str, Any] = {
            "phases_mb": peaks,
            "peak_mb": round(max(self.lifetime_kb, hwm) / 1024, 1),
            "per_phase_reset": self.resets,
        }
        if self.vram:
            out["vram_phases_mb"] = dict(self.vram)
        return out


def gc_collect() -> None:
    """Collect Python garbage (reference cycles keep tensors of a finished phase alive)."""
    import gc

    gc.collect()


def _cuda() -> Any:
    import sys

    torch = sys.modules.get("torch")  # never imports torch: a phase before torch loads has no VRAM to read
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


METER = PhaseMeter()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The phase meter resets the kernel's high-water mark at each phase; it keeps the lifetime peak itself.
    own = float(METER.report()["peak_mb"]) if sys.platform != "darwin" else 0.0
    if own > 0:
        # VmHWM is this program's own: Linux carries ru_maxrss across execve, so a trainer started by a large
        # process (the bot, a test runner at 1.6 GB) would report its parent's peak as its own.
        return own
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def job_resources(
    cfg: TrainConfig, model: Any, stats: dict[str, Any], *, base_gguf: Path | None, train_peak: float
) -> dict[str, Any]:
    """A finished job's memory for meta.json: measured peaks (whole life, training, per phase) beside the estimates."""
    measured = METER.report()
    peak = peak_rss_mb()
    shape = model_shape(base_gguf, model)
    return {
        "train_peak_rss_mb": train_peak,
        "peak_rss_mb": peak,
        "estimate_mb": estimate_mb(cfg, str(stats.get("device") or "cpu"), shape),
        "floor_mb": floor_mb(cfg, shape, stats),
        "phases_mb": measured["phases_mb"],
        **({"vram_phases_mb": measured["vram_phases_mb"]} if "vram_phases_mb" in measured else {}),
    }


def estimate_mb(cfg: TrainConfig, device: str, shape: ModelShape | None) -> dict[str, float] | None:
    """The pre-flight's estimate for this job (training, evaluation, peak) in MiB, to compare with the measured peak."""
    from jobspec.memory import memory_breakdown

    if shape is None:
        return None
    try:
        phases = memory_breakdown(shape, cfg, device)
    except Exception:
        return None
    return {k: round(v / 2**20, 1) for k, v in phases.items()}


def floor_mb(cfg: TrainConfig, shape: ModelShape | None, stats: dict[str, Any]) -> float | None:
    """What training could not do without, in MiB: weights, LoRA state, one mean micro-batch's activations."""
    from jobspec.memory import floor_bytes

    batches = int(stats.get("steps") or 0) * int(stats.get("grad_accum") or cfg.grad_accum)
    if shape is None or not batches:
        return None
    tokens = max(1, int(stats.get("real_tokens") or 0) // batches)
    return round(floor_bytes(shape, cfg, tokens) / 2**20, 1)


def model_shape(base_gguf: Path | None, model: Any) -> ModelShape | None:
    """The base's shape as pre-flight reads it (the GGUF header); a base known only as a HF folder, from `model`."""
    from core.ggufinfo import ModelShape, read_shape

    if base_gguf is not None and base_gguf.is_file():
        try:
            return read_shape(base_gguf)
        except Exception:
            return None
    config = getattr(model, "config", None)
    if config is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    return ModelShape(
        architecture=str(config.model_type),
        params=int(params),
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        vocab=int(config.vocab_size),
        context=int(getattr(config, "max_position_embeddings", 0) or 0),
        file_bytes=0,
    )
