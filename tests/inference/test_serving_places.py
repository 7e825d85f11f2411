"""Serving and erasure across processes, with real processes: llama-server, `doppel serve`, a second Python
process serving as the bot does, and `doppel forget` from a shell."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.chatformat import Utterance
from core.settings import Settings
from inference.engine import Engine
from inference.requests import GenParams, PersonaRequest
from inference.server import ServerEngine
from tests.helpers.llama_server import free_port, running_server, server_binary

pytestmark = pytest.mark.timeout(2700)  # the first test may build llama-server (about 8 minutes, once)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]
GREEDY = GenParams(max_tokens=12, temperature=0.0)
KEY = "test-key-0123456789"


def persona(member: str, adapter: str | None) -> PersonaRequest:
    mode = "adapter" if adapter else "base"
    return PersonaRequest(member, f"m{member}", "general", mode, ((adapter, 1.0),) if adapter else (), "g1")


async def text(engine: Engine | ServerEngine, p: PersonaRequest) -> str:
    return "".join([c async for c in engine.reply(p, CONTEXT, GREEDY)])


def in_process(settings: Settings, base: Path, personas: list[PersonaRequest]) -> list[str]:
    async def go() -> list[str]:
        async with Engine(settings, base) as engine:
            return [await text(engine, p) for p in personas]

    return asyncio.run(go())


def test_every_request_to_a_llama_server_states_every_adapter_also_for_a_fresh_client_and_after_a_reordered_restart(
    small_settings: Settings, base_gguf: Path, lora_paths: list[str], tmp_path: Path
) -> None:
    a, b, plain = persona("10", lora_paths[0]), persona("11", lora_paths[1]), persona("12", None)
    want = dict(zip(("a", "b", "plain"), in_process(small_settings, base_gguf, [a, b, plain]), strict=True))
    assert len(set(want.values())) == 3, "each adapter must change the reply"
    binary, port = server_binary(), free_port()

    async def go() -> dict[str, list[str]]:
        got: dict[str, list[str]] = {"first": [], "restarted": []}
        async with ServerEngine(
            small_settings, url=f"http://127.0.0.1:{port}", flavour="llama.cpp"
        ) as client:
            with running_server(binary, base_gguf, lora_paths[:2], port=port, log=tmp_path / "one.log"):
                for p in (plain, a, b, a):  # the fresh client's first request has no adapter
                    got["first"].append(await text(client, p))
            # The same port, the same client, the --lora list in the other order: ids 0 and 1 swap.
            with running_server(binary, base_gguf, lora_paths[1::-1], port=port, log=tmp_path / "two.log"):
                for p in (a, plain, b):
                    got["restarted"].append(await text(client, p))
        return got

    got = asyncio.run(go())
    assert got["first"] == [want["plain"], want["a"], want["b"], want["a"]]
    assert got["restarted"] == [want["a"], want["plain"], want["b"]]


# -- a community's home with published personas ---------------------------------------------------------------
def artifact(
    root: Path, base: Path, settings: Settings, member: str, seed: int, lineage: tuple[str, ...]
) -> Path:
    """A trained-like adapter folder for the bundled base that passes the registry's gate."""
    from inference.synthetic import write_random_lora
    from models.catalog import file_sha256

    folder = root / f"artifact-{member}-{seed}"
    folder.mkdir(parents=True)
    write_random_lora(base, folder / "adapter.gguf", seed=seed, strength=0.3)
    meta = {
        "member": member,
        "lineage": [member, *lineage],
        "metrics": {"ppl_adapter": 10.0, "ppl_base": 20.0, "active": True, "gate_reason": "beats base"},
        "base_model": {
            "name": settings.model.base_name,
            "path": str(base),
            "gguf": str(base),
            "sha256": file_sha256(base),
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


async def publish(settings: Settings, store: Any, folder: Path) -> str:
    from models.registry import Registry

    version = await Registry(store, settings).publish(folder)
    assert version.status == "active"
    return str(version.gguf_path)


async def consent(store: Any, *members: str) -> None:
    from consent.service import ConsentService

    await ConsentService(store).grant(list(members), ["train", "chat"], actor="operator", channel="cli")


def test_retrained_after_forget_the_new_version_has_a_new_folder_and_running_servers_serve_the_new_weights(
    small_settings: Settings, base_gguf: Path, tmp_path: Path
) -> None:
    from data.store import Store
    from inference.persona_server import LlamaServerProcess, PersonaServer, ServeOptions
    from inference.places import ServingPlace
    from models.registry import Registry

    settings = small_settings
    port = free_port()
    opts = ServeOptions(server_binary(), base_gguf.resolve(), port=port, n_ctx=512, slots=1, threads=1)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with Store.open(settings) as store, Engine(settings, base_gguf) as engine:
            await consent(store, "10")
            old = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "10", 1, ()))
            place = ServingPlace(store, "engine", "test engine", engine)
            await place.start()
            server = PersonaServer(
                store, Registry(store, settings), settings.model.base_name, LlamaServerProcess(opts)
            )
            stop = asyncio.Event()
            task = asyncio.create_task(server.run(stop, poll_s=0.2))
            await asyncio.wait_for(server.ready.wait(), 120)
            async with ServerEngine(settings, url=server.process.url, flavour="llama.cpp") as client:
                out["old_served"] = await text(client, persona("10", old))
                out["old_engine"] = await text(engine, persona("10", old))
                from consent.erasure import forget
                from doppel.erasure import erasure_parts

                report = await forget(store, settings, "10", "operator", "cli", parts=erasure_parts())
                out["serving"] = report.serving
                await consent(store, "10")
                new = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "10", 2, ()))
                for _ in range(100):  # the manager restarts with the new persona within its poll
                    if server.process.loras == (str(Path(new).resolve()),):
                        break
                    await asyncio.sleep(0.1)
                out["new_served"] = await text(client, persona("10", new))
                out["new_engine"] = await text(engine, persona("10", new))
            stop.set()
            await task
            await place.close()
            out["old"], out["new"] = old, new
        return out

    got = asyncio.run(go())
    fresh = in_process(settings, base_gguf, [persona("10", got["new"])])[0]
    assert Path(got["new"]).parent != Path(got["old"]).parent, (
        "a new version never reuses an erased one's folder"
    )
    assert not Path(got["old"]).exists()
    assert got["old_served"] == got["old_engine"] and got["new_served"] == got["new_engine"] == fresh
    assert got["new_engine"] != got["old_engine"], "the retrained weights must change the reply"
    labels = {s["place"]: s for s in got["serving"]}
    assert labels["test engine"]["released"] and labels["test engine"]["held"]
    managed = next(s for label, s in labels.items() if "doppel serve" in label)
    assert managed["held"] and managed["released"]


# -- processes ----------------------------------------------------------------------------------------------
def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOPPEL_")}
    env.update(
        DOPPEL_HOME=str(home),
        DOPPEL_INFERENCE__N_THREADS="1",
        DOPPEL_INFERENCE__N_CTX="512",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


class Proc:
    """A long-running child speaking JSON lines."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 120) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.p.stdout.readline()
            if got:
                return got
            if self.p.poll() is not None:
                raise AssertionError(
                    f"child exited {self.p.returncode}: {self.p.stderr.read() if self.p.stderr else ''}"
                )
        raise AssertionError("no line from the child in time")

    def ask(self, op: dict[str, Any]) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(op) + "\n")
        self.p.stdin.flush()
        return dict(json.loads(self.line()))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def forget_cli(home: Path, member: str, json_out: bool = True) -> subprocess.CompletedProcess[str]:
    """`doppel forget MEMBER` from a shell of its own."""
    argv = [sys.executable, "-m", "doppel", *(["--json"] if json_out else []), "forget", member]
    return subprocess.run(argv, cwd=ROOT, env=env_for(home), capture_output=True, text=True, timeout=120)


def get(url: str, key: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def test_forget_from_a_shell_reaches_the_bots_engine_its_server_and_the_managed_server_and_names_each(
    settings: Settings, base_gguf: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    import psutil

    from data.store import Store

    server_binary()  # built (or found) before any child needs it
    home = settings.home

    async def seed() -> dict[str, str]:
        async with Store.open(settings) as store:
            await consent(store, "10", "11")
            a = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "10", 1, ()))
            # B's persona was trained on a conversation quoting A: forgetting A retires it too (lineage).
            b = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "11", 2, ("10",)))
            return {"a": a, "b": b}

    paths = asyncio.run(seed())
    port = free_port()
    serve = Proc(
        [sys.executable, "-m", "doppel", "serve", "--port", str(port), "--slots", "1", "--threads", "1"],
        env_for(home, DOPPEL_SERVER_API_KEY=KEY),
    )
    procs.append(serve)
    assert f"127.0.0.1:{port}" in serve.line(timeout=600)
    url = f"http://127.0.0.1:{port}"
    assert get(url + "/lora-adapters", None)[0] == 401, "without the key the server refuses"
    status, listed = get(url + "/lora-adapters", KEY)
    assert status == 200 and sorted(a["path"] for a in listed) == sorted(
        str(Path(p).resolve()) for p in paths.values()
    )
    server_pid = next(c.pid for c in psutil.Process(serve.p.pid).children() if "llama-server" in c.name())
    bound = {
        c.laddr.ip for c in psutil.Process(server_pid).net_connections() if c.status == psutil.CONN_LISTEN
    }
    assert bound == {"127.0.0.1"}, "doppel serve binds the loopback address unless told otherwise"

    bot = Proc([sys.executable, "-m", "tests.helpers.servingbot"], env_for(home))
    client = Proc(
        [sys.executable, "-m", "tests.helpers.servingbot"],
        env_for(
            home,
            DOPPEL_INFERENCE__BACKEND="server",
            DOPPEL_INFERENCE__SERVER_URL=url,
            DOPPEL_SERVER_API_KEY=KEY,
        ),
    )
    # `doppel chat`'s REPL serves a persona too, from its own in-process engine.
    chat = Proc(
        [sys.executable, "-m", "doppel", "chat", "10", "--mode", "adapter", "-t", "0", "--max-tokens", "6"],
        env_for(home),
    )
    procs += [bot, client, chat]
    for child in (bot, client):
        assert json.loads(child.line())["ready"]
    assert chat.p.stdin is not None
    chat.p.stdin.write("hello there\n")
    chat.p.stdin.flush()
    assert chat.line(timeout=300).strip(), "the REPL answered with A's adapter"
    before = {m: bot.ask({"op": "reply", "member": m}) for m in ("10", "11")}
    served = {m: client.ask({"op": "reply", "member": m}) for m in ("10", "11")}
    assert all("text" in r for r in (*before.values(), *served.values())), (before, served)
    assert served["10"]["text"] == before["10"]["text"], "the key-bearing client is served A's own weights"
    assert len(bot.ask({"op": "held"})["adapters"]) == 2

    started = time.monotonic()
    done = forget_cli(home, "10")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    places = {s["place"]: s for s in report["serving"]}
    assert len(places) == 4, places
    assert all(s["answered"] and s["released"] for s in places.values()), places
    kinds = " | ".join(places)
    assert "in process" in kinds and f"client of {url}" in kinds and "doppel serve" in kinds
    assert next(s for p, s in places.items() if "doppel chat" in p)["held"], "the REPL let go of A's adapter"
    assert next(s for p, s in places.items() if "doppel serve" in p)["held"]
    assert next(s for p, s in places.items() if "in process" in p)["held"]
    assert took < settings.inference.erasure_wait_s + 30
    assert {a["member_id"] for a in report["adapters_retired"]} == {"10", "11"}
    # Everywhere, the next request for either persona is refused: nothing is served with an erased adapter.
    for child in (bot, client):
        assert "not allowed chat" in child.ask({"op": "reply", "member": "10"}).get("error", "")
        assert "no trained persona" in child.ask({"op": "reply", "member": "11"}).get("error", "")
    assert bot.ask({"op": "held"})["adapters"] == []
    # The REPL reads consent again before its next reply: it ends in one line instead of answering.
    chat.p.stdin.write("still there?\n")
    chat.p.stdin.flush()
    _, err = chat.p.communicate(timeout=60)
    assert chat.p.returncode == 2 and "has not consented to chat" in err and "Traceback" not in err, err
    status, listed = get(url + "/lora-adapters", KEY)
    assert status == 200 and listed == []


def test_doppel_serve_refuses_to_bind_a_reachable_address_without_a_key(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "doppel", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        env=env_for(settings.home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "without a key" in lines[0] and "DOPPEL_SERVER_API_KEY" in lines[0]


def test_a_serving_process_down_when_forget_runs_is_named_and_does_not_load_the_erased_adapter_again(
    settings: Settings, base_gguf: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    import signal

    import psutil

    from data.store import Store

    server_binary()
    home = settings.home

    async def seed() -> dict[str, str]:
        async with Store.open(settings) as store:
            await consent(store, "10", "11")
            a = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "10", 1, ()))
            b = await publish(settings, store, artifact(tmp_path, base_gguf, settings, "11", 2, ()))
            return {"a": str(Path(a).resolve()), "b": str(Path(b).resolve())}

    paths = asyncio.run(seed())
    port = free_port()
    argv = [sys.executable, "-m", "doppel", "serve", "--port", str(port), "--slots", "1", "--threads", "1"]
    serve = Proc(argv, env_for(home))
    bot = Proc([sys.executable, "-m", "tests.helpers.servingbot"], env_for(home))
    procs += [serve, bot]
    assert f"127.0.0.1:{port}" in serve.line(timeout=600)
    assert json.loads(bot.line())["ready"]
    assert "text" in bot.ask({"op": "reply", "member": "10"})
    llama = next(c for c in psutil.Process(serve.p.pid).children() if "llama-server" in c.name())
    # Both killed outright: neither unregisters, and the server's llama-server must not live on as an orphan.
    for child in (serve, bot):
        child.p.send_signal(signal.SIGKILL)
        child.p.wait(10)
    llama.wait(10)
    assert not llama.is_running(), "llama-server outlived the doppel serve that started it"

    started = time.monotonic()
    done = forget_cli(home, "10")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < settings.inference.erasure_wait_s, "a dead process is not waited for"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    places = {s["place"]: s for s in report["serving"]}
    assert len(places) == 2 and all(not s["answered"] and s["down"] for s in places.values()), places
    assert any("doppel serve" in p for p in places) and any("persona engine" in p for p in places)
    words = forget_cli(home, "11", json_out=False)
    # Named once: the second erasure has no dead place left to name.
    assert words.returncode == 0 and "not running" not in words.stdout, words.stdout

    # Started again, the server and the bot serve from durable state: neither erased adapter comes back.
    async def one_more() -> str:
        async with Store.open(settings) as store:
            await consent(store, "12")
            return str(
                Path(
                    await publish(settings, store, artifact(tmp_path, base_gguf, settings, "12", 3, ()))
                ).resolve()
            )

    c = asyncio.run(one_more())
    serve = Proc(argv, env_for(home))
    bot = Proc([sys.executable, "-m", "tests.helpers.servingbot"], env_for(home))
    procs += [serve, bot]
    assert f"127.0.0.1:{port}" in serve.line(timeout=600)
    assert json.loads(bot.line())["ready"]
    status, listed = get(f"http://127.0.0.1:{port}/lora-adapters", None)
    assert status == 200 and [a["path"] for a in listed] == [c], (listed, paths)
    assert "not allowed chat" in bot.ask({"op": "reply", "member": "10"}).get("error", "")
    assert "text" in bot.ask({"op": "reply", "member": "12"})
    assert bot.ask({"op": "held"})["adapters"] == [c]
