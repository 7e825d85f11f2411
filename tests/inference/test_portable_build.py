"""The llama.cpp build runs on the CPU it was installed on: never native, never AMX, and it really generates."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from doppel import llamabuild

SAPPHIRE_RAPIDS = {
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx_vnni",
    "avx512f",
    "avx512cd",
    "avx512vl",
    "avx512dq",
    "avx512bw",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
}
ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
# ggml's AMX kernels start with a tile configuration: any of these in the binary can SIGILL on a worker thread.
TILE_MNEMONICS = ("ldtilecfg", "tilezero", "tileloadd", "tdpbssd", "tdpbf16ps", "tilestored", "tilerelease")


def _opts(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("-D").split("=", 1) for a in args if a.startswith("-D"))


def test_flags_follow_the_cpu_and_never_include_native_or_amx() -> None:
    spr = _opts(llamabuild.cmake_args(SAPPHIRE_RAPIDS, "x86_64", cuda=False))
    assert spr["GGML_NATIVE"] == "OFF"
    assert spr["GGML_AMX_TILE"] == spr["GGML_AMX_INT8"] == spr["GGML_AMX_BF16"] == "OFF"
    assert (
        spr["GGML_AVX512"] == spr["GGML_AVX512_VNNI"] == spr["GGML_AVX512_BF16"] == spr["GGML_AVX2"] == "ON"
    )
    zen3 = _opts(llamabuild.cmake_args(ZEN3, "x86_64", cuda=False))
    assert zen3["GGML_AVX2"] == zen3["GGML_FMA"] == "ON" and zen3["GGML_AVX512"] == "OFF"
    # AVX-512 needs all five subsets ggml compiles with; a CPU with only some of them gets AVX2.
    partial = _opts(llamabuild.cmake_args(ZEN3 | {"avx512f", "avx512cd"}, "x86_64", cuda=False))
    assert partial["GGML_AVX512"] == "OFF"
    arm = _opts(llamabuild.cmake_args({"fp", "asimd", "asimddp"}, "aarch64", cuda=False))
    assert arm["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod" and "GGML_AVX2" not in arm
    assert _opts(llamabuild.cmake_args(ZEN3, "x86_64", cuda=True))["GGML_CUDA"] == "ON"


def test_the_cache_key_changes_with_the_flags_and_only_with_them() -> None:
    a = llamabuild.build_key(llamabuild.cmake_args(ZEN3, "x86_64", cuda=False))
    b = llamabuild.build_key(llamabuild.cmake_args(set(sorted(ZEN3, reverse=True)), "x86_64", cuda=False))
    c = llamabuild.build_key(llamabuild.cmake_args(SAPPHIRE_RAPIDS, "x86_64", cuda=False))
    assert a == b != c


def _ggml_cpu_library() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.rglob("libggml-cpu*.so*")) or sorted(folder.rglob("libggml*.so*"))
    assert found, f"no ggml library under {folder}"
    return found[0]


def test_the_installed_build_is_the_portable_one_for_this_cpu() -> None:
    record = llamabuild.installed_info()
    assert record is not None, (
        "llama-cpp-python was not installed by doppel/llamabuild.py (a native pip build?)"
    )
    assert record["key"] == llamabuild.build_key(llamabuild.wanted_args()), (
        "built for another CPU: rerun setup"
    )
    opts = _opts(list(record["cmake_args"]))  # type: ignore[arg-type]
    assert opts["GGML_NATIVE"] == "OFF" and opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == "OFF"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_the_installed_ggml_carries_no_amx_tile_instructions() -> None:
    library = _ggml_cpu_library()
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "vfmadd" in listing or "fmla" in listing or "mulps" in listing, (
        "objdump did not disassemble the kernels"
    )
    found = sorted({m for m in TILE_MNEMONICS if f"\t{m}" in listing or f" {m} " in listing})
    assert found == [], f"{library.name} contains AMX tile instructions: {found}"


def test_generation_with_two_threads_exits_cleanly(base_gguf: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference.probe",
            "--model",
            str(base_gguf),
            "--threads",
            "2",
            "--tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, f"probe ended with {done.returncode}: {done.stderr[-1500:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["generated"] >= 1 and result["threads"] == 2 and result["adapter"]


def test_doctor_proves_the_engine_and_words_a_crash(settings: object, base_gguf: Path) -> None:
    from doppel.commands.doctor import engine_checks, engine_probe

    checks = {c.name: c for c in engine_checks(settings)}  # type: ignore[arg-type]
    assert checks["llama.cpp build"].status == "ok", checks["llama.cpp build"]
    assert checks["engine"].status == "ok" and "with an adapter on" in checks["engine"].detail, checks[
        "engine"
    ]
    assert f"{settings.inference.base_budget_mb} MiB of base GGUFs" in checks["served bases"].detail  # type: ignore[attr-defined]
    # A probe that really dies by SIGILL (as a build with instructions this CPU lacks does) fails in words.
    sigill = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    failed = engine_probe(settings, command=sigill)  # type: ignore[arg-type]
    assert failed.status == "fail"
    assert (
        "CPU instruction this machine cannot run (SIGILL)" in failed.detail
        and "scripts/setup.sh" in failed.fix
    )
