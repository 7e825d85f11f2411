"""`doppel serve`: a managed llama.cpp persona server for one base, kept in step with the registry.

llama-server loads adapters only at its start, so the manager restarts it whenever the base's active personas
change (a persona published, rolled back or erased): after the replies in flight finish for a publish, at once for
an erasure. It registers as a serving place, so `forget` from any process waits until it restarted without the
member's adapters and names it in its report. It binds 127.0.0.1 unless told otherwise, and then only with a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.errors import ServerError
from inference.places import LetGo, ServingPlace

if TYPE_CHECKING:
    from data.store import Store
    from models.registry import Registry

log = logging.getLogger(__name__)

# A publish waits this long for the replies in flight before the restart cuts them.
DRAIN_S = 30.0
HEALTHY_S = 120.0


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, api_key: str | None) -> None:
    """Refuse, in one line, to serve members' personas on a reachable address without a key."""
    if not is_loopback(host) and not api_key:
        raise ServerError(
            f"refusing to serve on {host} without a key: anyone who reaches it could generate with any member's "
            "adapter; set DOPPEL_SERVER_API_KEY (the bot sends it) or bind 127.0.0.1"
        )


@dataclass(frozen=True)
class ServeOptions:
    """How llama-server runs: the same flags as the tested server backend (one context per slot, no RAM cache)."""

    binary: Path
    base: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    n_ctx: int = 2048
    slots: int = 2
    threads: int = 0
    log: Path | None = None


def _die_with_parent() -> Callable[[], None] | None:
    """What the child runs before exec: a `doppel serve` killed outright (SIGKILL, OOM) takes its llama-server
    along, so no orphan goes on serving adapters that a later erasure could not reach. Looked up here, in the
    parent: the forked child only calls it (an import there could wait on a lock another thread held)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: no parent-death signal
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def child() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return child


class LlamaServerProcess:
    """One llama-server child, started with a `--lora` list (ids are positions in it) and stopped again."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.loras: tuple[str, ...] = ()
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.opts.host in ("0.0.0.0", "::") else self.opts.host
        return f"http://{host}:{self.opts.port}"

    def command(self, loras: Sequence[str]) -> list[str]:
        o = self.opts
        cmd = [str(o.binary), "-m", str(o.base), "--host", o.host, "--port", str(o.port), "-c", str(o.n_ctx)]
        cmd += ["-np", str(o.slots), "-fa", "off", "--cache-ram", "0", "--lora-init-without-apply"]
        if o.threads > 0:
            cmd += ["-t", str(o.threads), "-tb", str(o.threads)]
        for path in loras:
            cmd += ["--lora", path]
        return cmd

    async def start(self, loras: Sequence[str]) -> None:
        """Start llama-server with `loras` and wait until it is healthy."""
        env = dict(os.environ)
        env.pop("LLAMA_API_KEY", None)
        if self.opts.api_key:
            env["LLAMA_API_KEY"] = self.opts.api_key  # from the environment, never on the command line (ps)
        out: Any = subprocess.DEVNULL
        if self.opts.log is not None:
            self.opts.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.opts.log, "ab")
        try:
            self.proc = subprocess.Popen(
                self.command(loras),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent(),
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        self.loras = tuple(loras)
        deadline = time.monotonic() + HEALTHY_S
        while not await asyncio.to_thread(self._healthy):
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"llama-server exited with code {code} at start (port {self.opts.port} in use, or a bad "
                    f"adapter or base); its log: {self.opts.log or 'not kept (use --log)'}"
                )
            if time.monotonic() > deadline:
                await self.stop()
                raise ServerError(f"llama-server did not become healthy within {HEALTHY_S:.0f} s")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s)."""
        proc, self.proc = self.proc, None
        self.loras = ()
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def restart(self, loras: Sequence[str]) -> None:
        await self.stop()
        await self.start(loras)
        self.restarts += 1

    async def busy(self) -> bool:
        """Whether a slot is generating (a reply in flight)."""
        slots = await asyncio.to_thread(self._get, "/slots")
        return isinstance(slots, list) and any(s.get("is_processing") for s in slots)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path)
        if self.opts.api_key:
            req.add_header("Authorization", f"Bearer {self.opts.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None


class PersonaServer:
    """Keeps one llama-server serving exactly the active personas of one base, and lets erased ones go at once."""

    def __init__(self, store: Store, registry: Registry, base_name: str, process: LlamaServerProcess) -> None:
        self.store = store
        self.registry = registry
        self.base_name = base_name
        self.process = process
        self._lock = asyncio.Lock()
        self.place: ServingPlace | None = None
        self.ready = asyncio.Event()  # set once it serves and is registered
        # Adapters a restart dropped, and when: an erasure whose files went before its notice arrived was still
        # held by this server until that restart, and its answer says so.
        self._dropped: dict[str, float] = {}

    async def wanted(self) -> list[str]:
        """The llama.cpp adapter files of the base's active personas, in a stable order."""
        found = []
        for version in await self.registry.active_personas():
            gguf = version.gguf_path
            if version.base_model == self.base_name and gguf.is_file():
                found.append(str(gguf.resolve()))
        return sorted(found)

    async def run(self, stop: asyncio.Event, *, poll_s: float = 1.0) -> None:
        """Serve until `stop` is set; restart when the active personas change."""
        await self.process.start(await self.wanted())
        label = f"llama-server at {self.process.url} (doppel serve, pid {os.getpid()})"
        self.place = ServingPlace(self.store, "server", label, self)
        await self.place.start()
        self.ready.set()
        log.info(
            "serving %d persona(s) of %s at %s", len(self.process.loras), self.base_name, self.process.url
        )
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), poll_s)
                if stop.is_set():
                    break
                want = await self.wanted()
                if tuple(want) != self.process.loras:
                    async with self._lock:
                        if set(self.process.loras) <= set(want):
                            await self._drain()  # only added personas: the replies in flight finish first
                        # A persona no longer active (erased, retired) stops being served at once.
                        await self._restart(await self.wanted())
                    log.info("restarted with %d persona(s)", len(self.process.loras))
        finally:
            await self.place.close()
            await self.process.stop()

    async def let_go(self, member_id: str, doomed: Callable[[str], bool]) -> LetGo:
        """Erasure: restart at once without every doomed adapter (replies in flight with them are cut)."""
        async with self._lock:
            recent = [p for p, at in self._dropped.items() if at > time.monotonic() - 600]
            held = any(doomed(p) for p in (*self.process.loras, *recent))
            if any(doomed(p) for p in self.process.loras):
                await self._restart([p for p in await self.wanted() if not doomed(p)])
            still = [p for p in self.process.loras if doomed(p)]
        if still:
            return LetGo(True, False, f"restarted but still lists {', '.join(still)}")
        return LetGo(held, True, "restarted without the adapter" if held else "")

    async def _restart(self, loras: list[str]) -> None:
        now = time.monotonic()
        self._dropped = {p: at for p, at in self._dropped.items() if at > now - 600}
        self._dropped.update({p: now for p in self.process.loras if p not in loras})
        await self.process.restart(loras)

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and await self.process.busy():
            await asyncio.sleep(0.1)
