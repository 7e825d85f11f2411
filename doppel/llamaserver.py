"""Builds (or reuses) llama.cpp's `llama-server` from the sources the llama-cpp-python sdist vendors, for this CPU.

The same portable CMake flags as the wheel (doppel/llamabuild.py: never -march=native, never AMX), statically
linked, kept in ~/.cache/doppel/llama-server/<key>/ (DOPPEL_SERVER_CACHE moves it) keyed like the wheel, so a
binary built with other flags is never handed back. About 8 minutes on 2 cores, once. The sdist is taken from
DOPPEL_LLAMA_SDIST, or ~/.cache/doppel/sdist/, or `pip download` (a package registry) into that folder.
Stdlib only: `python doppel/llamaserver.py` prints the binary's path (building it when needed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    from doppel.llamabuild import VERSION, wanted_args
except ImportError:  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from doppel.llamabuild import VERSION, wanted_args

BINARY = "llama-server"
SERVER_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


class ServerBuildError(RuntimeError):
    """llama-server could not be built (no sdist, no compiler, a failed build)."""


def cmake_args() -> list[str]:
    """The wheel's CMake arguments for this CPU plus the server's own (static, no curl)."""
    return [a for a in wanted_args() if a != "-DLLAVA_BUILD=OFF"] + list(SERVER_ARGS)


def server_key(args: list[str]) -> str:
    """The cache key: version, platform and CMake arguments (a binary does not depend on the Python)."""
    raw = json.dumps([BINARY, VERSION, platform.machine(), sys.platform, args])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("DOPPEL_SERVER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "doppel" / "llama-server"


def cached_binary() -> Path | None:
    """The cached llama-server for this CPU's flags, if it was built already."""
    path = cache_root() / server_key(cmake_args()) / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def sdist() -> Path:
    """The llama-cpp-python sdist of the pinned version (downloaded once through pip when absent)."""
    env = os.environ.get("DOPPEL_LLAMA_SDIST")
    if env:
        if not Path(env).is_file():
            raise ServerBuildError(f"DOPPEL_LLAMA_SDIST={env} is not a file")
        return Path(env)
    folder = Path.home() / ".cache" / "doppel" / "sdist"
    name = f"llama_cpp_python-{VERSION}.tar.gz"
    if not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += [f"llama-cpp-python=={VERSION}", "-d", str(folder), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if not (folder / name).is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServerBuildError(f"pip download llama-cpp-python=={VERSION} failed: {tail[0]}")
    return folder / name


def build(jobs: int | None = None) -> Path:
    """The llama-server binary for this CPU: the cached one, or built now (niced) and cached."""
    found = cached_binary()
    if found is not None:
        return found
    args = cmake_args()
    target = cache_root() / server_key(args)
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="doppel-llama-server-") as tmp:
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise ServerBuildError(f"the sdist has no {prefix}")
            tar.extractall(tmp, members=members, filter="data")
        src, out = Path(tmp) / prefix, Path(tmp) / "build"
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        for cmd in (
            [*nice, "cmake", "-S", str(src), "-B", str(out), *args],
            [*nice, "cmake", "--build", str(out), "--target", BINARY, "-j", str(jobs)],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise ServerBuildError(f"{' '.join(cmd[len(nice) :][:3])} failed: {' | '.join(tail)}")
        built = next((p for p in out.rglob(BINARY) if p.is_file()), None)
        if built is None:
            raise ServerBuildError(f"the build produced no {BINARY}")
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(built, staging / BINARY)
        # Renamed into place: a half-copied binary is never taken for a cached one.
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target / BINARY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    binary: Path,
    base: Path,
    loras: Sequence[str],
    *,
    n_ctx: int = 512,
    threads: int = 1,
    log: Path | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """llama-server on `base` with `loras` (ids in order, none applied until a request asks), as the
    in-process engine runs: one slot, 512-token batches, flash attention off, and no RAM prompt cache (it could
    restore KV computed under another adapter, llama.cpp #26207)."""
    port = port or free_port()
    cmd = [str(binary), "-m", str(base), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx)]
    cmd += [
        "-np",
        "1",
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-b",
        "512",
        "-ub",
        "512",
        "-fa",
        "off",
        "--cache-ram",
        "0",
    ]
    cmd += ["--lora-init-without-apply"]
    for path in loras:
        cmd += ["--lora", path]
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise ServerBuildError(f"llama-server exited with {proc.returncode} ({' '.join(cmd)})")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerBuildError("llama-server did not become healthy in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


if __name__ == "__main__":
    try:
        print(build())
    except ServerBuildError as exc:
        print(f"llama-server: {exc}", file=sys.stderr)
        sys.exit(1)
