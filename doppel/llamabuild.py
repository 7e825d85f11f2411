"""Builds (or reuses) a portable llama-cpp-python wheel for this CPU and installs it into the running Python.

pip's default build is `-march=native`: on an Intel Xeon with AMX it compiles ggml's AMX kernels, which die with
SIGILL on worker threads (the vendored ggml asks for tile permission on the main thread only). So the build is
`GGML_NATIVE=OFF` with the SIMD flags this CPU really has, AMX always off, and the same flags for the same feature
set on every machine. pip's wheel cache keys wheels by version only, so the wheel is kept in a cache of our own
keyed by version + CMake arguments; a wheel built with other flags is never handed back.

Environment: DOPPEL_LLAMA_CUDA=1 builds the CUDA backend (GPU host; needs nvcc); DOPPEL_WHEEL_CACHE moves the
cache (default ~/.cache/doppel/wheels); DOPPEL_LLAMA_CMAKE_ARGS appends CMake arguments (they enter the key).
Stdlib only: `scripts/setup.sh` runs this file before anything else is installed; `doppel doctor` imports it to
check that the installed build matches this machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"
BUILD_INFO = "doppel_llama_build.json"

# /proc/cpuinfo flag -> ggml CMake option. The AVX-512 option compiles F/CD/VL/DQ/BW, so it needs all five.
X86_OPTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
]
# Never on: ggml's AMX kernels need per-thread tile permission that the vendored llama.cpp does not request
# (upstream PR #26954); on Linux they die with SIGILL on OpenMP worker threads.
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (x86 'flags', ARM 'Features')."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cmake_args(flags: set[str], machine: str, cuda: bool) -> list[str]:
    """The CMake arguments for this feature set: deterministic, never native, never AMX."""
    args = ["-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF"]
    if machine in ("x86_64", "amd64"):
        for option, needs in X86_OPTIONS:
            args.append(f"-D{option}={'ON' if all(n in flags for n in needs) else 'OFF'}")
        args += [f"-D{option}=OFF" for option in ALWAYS_OFF]
    elif machine in ("aarch64", "arm64"):
        # NEON is part of armv8-a; dotprod / fp16 arithmetic / i8mm only when the kernel reports them.
        arch = "armv8.2-a" if "asimddp" in flags or "asimdhp" in flags else "armv8-a"
        extras = [
            ext
            for flag, ext in (("asimddp", "dotprod"), ("asimdhp", "fp16"), ("i8mm", "i8mm"))
            if flag in flags
        ]
        args.append("-DGGML_CPU_ARM_ARCH=" + "+".join([arch, *extras]))
    if cuda:
        args.append("-DGGML_CUDA=ON")
    extra = os.environ.get("DOPPEL_LLAMA_CMAKE_ARGS", "").split()
    return args + extra


def build_key(args: list[str]) -> str:
    """The cache key: version, Python tag, platform and CMake arguments."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    raw = json.dumps([VERSION, tag, platform.machine(), sys.platform, args])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def package_dir() -> Path | None:
    """Where llama_cpp is installed, found without loading its native libraries."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_info() -> dict[str, object] | None:
    """The build record of the installed llama_cpp, if it was installed by this script."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = package_dir()
    record = folder / BUILD_INFO if folder else None
    if version != VERSION or record is None or not record.is_file():
        return None
    try:
        return dict(json.loads(record.read_text()))
    except (OSError, ValueError):
        return None


def wanted_args() -> list[str]:
    """The CMake arguments this machine should have been built with (its CPU flags, DOPPEL_LLAMA_CUDA)."""
    cuda = os.environ.get("DOPPEL_LLAMA_CUDA", "") not in ("", "0")
    return cmake_args(cpu_flags(), platform.machine().lower(), cuda)


def main() -> int:
    flags = cpu_flags()
    cuda = os.environ.get("DOPPEL_LLAMA_CUDA", "") not in ("", "0")
    args = wanted_args()
    key = build_key(args)
    current = installed_info()
    if current is not None and current.get("key") == key:
        print(f"llama-cpp-python {VERSION}: portable build {key} already installed")
        return 0
    cache = Path(os.environ.get("DOPPEL_WHEEL_CACHE") or Path.home() / ".cache" / "doppel" / "wheels") / key
    wheels = sorted(cache.glob("llama_cpp_python-*.whl")) if cache.is_dir() else []
    if not wheels:
        print(f"llama-cpp-python {VERSION}: compiling ({' '.join(args)}); about 7 minutes on 2 cores")
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, CMAKE_ARGS=" ".join(args), FORCE_CMAKE="1")
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp]
            cmd += ["--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}"]
            subprocess.run(cmd, check=True, env=env)
            built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
            if not built:
                print("llama-cpp-python build produced no wheel", file=sys.stderr)
                return 1
            staging = cache.with_name(cache.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            shutil.copy2(built[0], staging / built[0].name)
            # Renamed into place so a half-copied wheel is never taken for a cached one.
            shutil.rmtree(cache, ignore_errors=True)
            staging.rename(cache)
        wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
    else:
        print(f"llama-cpp-python {VERSION}: reusing cached portable build {key}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--force-reinstall",
            "--no-cache-dir",
            str(wheels[0]),
        ],
        check=True,
    )
    importlib.invalidate_caches()
    folder = package_dir()
    if folder is None:
        print("llama-cpp-python did not install", file=sys.stderr)
        return 1
    record = {
        "version": VERSION,
        "key": key,
        "cmake_args": args,
        "machine": platform.machine(),
        "cpu_flags": sorted(
            f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "bmi", "sse", "asimd"))
        ),
        "cuda": cuda,
    }
    (folder / BUILD_INFO).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
