"""`add-base --from-hub`: huggingface_hub downloads from a local stand-in for the Hub (HF_ENDPOINT on 127.0.0.1);
offline, the command fails in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tinymodel import build_tiny

    return build_tiny(tmp_path_factory.mktemp("hubtiny"), chat_template=False).gguf_path


@pytest.fixture
def hub(tiny_gguf: Path) -> Iterator[dict[str, Any]]:
    """Serves `/{repo}/resolve/{revision}/{file}` (HEAD and GET) with the headers hf_hub_download reads."""
    files = {("someone/tiny-GGUF", "tiny-pt.gguf"): tiny_gguf.read_bytes()}
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _file(self) -> bytes | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                return files.get(("/".join(parts[:2]), "/".join(parts[4:])))
            return None

        def _headers(self, body: bytes | None) -> None:
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()

        def do_HEAD(self) -> None:
            seen.append(f"HEAD {self.path}")
            self._headers(self._file())

        def do_GET(self) -> None:
            seen.append(f"GET {self.path}")
            body = self._file()
            self._headers(body)
            if body is not None:
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "seen": seen}
    finally:
        server.shutdown()
        server.server_close()


def doppel(home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads TRANSFORMERS_OFFLINE as HF_HUB_OFFLINE: the online case drops both.
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full = {**base, "DOPPEL_HOME": str(home), **env}
    return subprocess.run(
        [sys.executable, "-m", "doppel", *args], capture_output=True, text=True, env=full, timeout=120
    )


def test_add_base_from_a_hub_stand_in(
    doppel_home: Path, hub: dict[str, Any], tiny_gguf: Path, tmp_path: Path
) -> None:
    env_online = {"HF_ENDPOINT": hub["url"], "HF_HOME": str(tmp_path / "hf")}
    done = doppel(
        doppel_home,
        "personas",
        "add-base",
        "hubtiny",
        "--from-hub",
        "someone/tiny-GGUF",
        "--file",
        "tiny-pt.gguf",
        "--json",
        env=env_online,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    added = json.loads(done.stdout.strip().splitlines()[-1])
    local = Path(added["path"])
    # In the usual cache layout (HF_HOME/hub/models--owner--name/...), byte for byte the file served.
    cache = tmp_path / "hf" / "hub" / "models--someone--tiny-GGUF"
    assert (cache / "snapshots" / COMMIT / "tiny-pt.gguf").resolve() == local  # registered by its real file
    assert local.read_bytes() == tiny_gguf.read_bytes()
    assert added["template_source"] == "default:chatml"
    assert any(s.startswith("GET /someone/tiny-GGUF/resolve/") for s in hub["seen"])
    # A file the repository lacks: one line, nothing registered under that name.
    done = doppel(
        doppel_home,
        "personas",
        "add-base",
        "nofile",
        "--from-hub",
        "someone/tiny-GGUF",
        "--file",
        "missing.gguf",
        env=env_online,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_add_base_from_hub_offline_is_one_line(doppel_home: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf")}
    done = doppel(
        doppel_home,
        "personas",
        "add-base",
        "x",
        "--from-hub",
        "someone/tiny-GGUF",
        "--file",
        "tiny-pt.gguf",
        env=env,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "offline (HF_HUB_OFFLINE is set)" in lines[0] and "Traceback" not in done.stderr
    ), lines
