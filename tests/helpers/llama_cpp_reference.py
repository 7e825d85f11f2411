"""llama.cpp's own LoRA converter, taken from the llama-cpp-python source distribution at test time (never vendored).

Where it comes from, first found wins: `DOPPEL_LLAMA_CPP_SRC` (a llama.cpp source tree), the pytest cache (the few
files the converter needs, extracted once), or `pip download` of the sdist matching the installed llama-cpp-python
(about 75 MB, once; pip's own cache makes later downloads local). When none works the tests that need it skip,
saying why: the project's setup is not responsible for it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

# What convert_lora_to_gguf.py imports from its tree: the per-architecture model classes and its own gguf-py.
NEEDED = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")
SDIST_PREFIX = "vendor/llama.cpp/"


def _complete(tree: Path) -> bool:
    return (
        (tree / "convert_lora_to_gguf.py").is_file()
        and (tree / "conversion").is_dir()
        and (tree / "gguf-py").is_dir()
    )


def _extract(sdist: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith(SDIST_PREFIX):
                    continue
                rel = parts[1][len(SDIST_PREFIX) :]
                if not any(rel == n or rel.startswith(n) for n in NEEDED) or not (
                    member.isfile() or member.isdir()
                ):
                    continue
                member.name = rel
                tar.extract(member, tmp, filter="data")
        if not _complete(tmp):
            raise RuntimeError(f"{sdist.name} has no llama.cpp converter under {SDIST_PREFIX}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converter_tree(cache_dir: Path) -> Path:
    """A folder holding convert_lora_to_gguf.py + conversion/ + gguf-py/, or pytest.skip with the reason."""
    env = os.environ.get("DOPPEL_LLAMA_CPP_SRC")
    if env:
        if _complete(Path(env)):
            return Path(env)
        pytest.skip(f"DOPPEL_LLAMA_CPP_SRC={env} has no convert_lora_to_gguf.py, conversion/ and gguf-py/")
    version = importlib.metadata.version("llama_cpp_python")
    tree = cache_dir / f"llama.cpp-{version}"
    if _complete(tree):
        return tree
    download = cache_dir / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    found = sorted(download.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(download),
            "--quiet",
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip("llama.cpp's converter: downloading the llama-cpp-python sdist timed out")
        found = sorted(download.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(
                f"llama.cpp's converter is not obtainable (pip download llama-cpp-python=={version}: {tail[0]});"
                " set DOPPEL_LLAMA_CPP_SRC to a llama.cpp source tree"
            )
    _extract(found[0], tree)
    found[0].unlink()  # the extracted converter is all that is kept (2 MB, not 75)
    return tree


def convert_lora(tree: Path, hf_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Run llama.cpp's convert_lora_to_gguf.py (its own gguf-py) on a PEFT adapter folder; returns `out`."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run(
        [
            sys.executable,
            str(tree / "convert_lora_to_gguf.py"),
            "--base",
            str(hf_dir),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
            str(adapter_dir),
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not out.is_file():
        raise AssertionError(f"llama.cpp's converter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out
