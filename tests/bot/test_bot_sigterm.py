"""Issue 12 (4): `doppel run` as a real process, connected to a local stand-in for Discord's REST API and gateway,
stops on SIGTERM like on Ctrl-C: a close frame with code 1000 to the gateway, the training child stopped, exit 0
within the grace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.discord_payloads import member, user

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

APP, GUILD, CHANNEL, ADMIN, ALICE = 9000, 1000, 2000, 333, 1001
# `doppel run` itself, with discord.py's two fixed addresses pointed at the stand-in (nothing else is changed).
LAUNCH = """
import os, sys, yarl
import discord.gateway, discord.http, discord.webhook.async_
base = os.environ["STANDIN_URL"]
discord.http.Route.BASE = base + "/api/v10"
discord.webhook.async_.Route.BASE = base + "/api/v10"
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http", "ws") + "/gateway/")
from doppel.cli import main
sys.exit(main(["run", "--no-sync", "--no-engine"]))
"""


class StandIn:
    """Discord's v10 REST and gateway, as much as `doppel run` and one `/persona train` need."""

    def __init__(self) -> None:
        self.close_codes: list[int | None] = []
        self.identified = asyncio.Event()
        self.ws: Any = None
        self.seq = 0
        self.posts: list[str] = []

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/gateway/", self.gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self.rest)
        return app

    async def rest(self, request: Any) -> Any:
        from aiohttp import web

        def json_response(
            body: Any,
        ) -> Any:  # discord.py wants Discord's exact content type, without a charset
            return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

        path, method = "/" + request.match_info["tail"], request.method
        body = await request.text()
        self.posts.append(f"{method} {path} {body[:300]}")
        if path == "/users/@me":
            return json_response(user(APP, "doppel", bot=True))
        if path == "/oauth2/applications/@me":
            return json_response(
                {
                    "id": str(APP),
                    "name": "doppel",
                    "description": "",
                    "icon": None,
                    "bot_public": False,
                    "bot_require_code_grant": False,
                    "owner": user(1, "owner"),
                    "verify_key": "00",
                    "flags": 0,
                }
            )
        if path.endswith("/callback"):
            return json_response({"interaction": {"id": path.split("/")[2], "type": 2}})
        if method in ("POST", "PATCH") and ("/webhooks/" in path or "/messages" in path):
            return json_response(
                {
                    "id": str(int(time.time() * 1000) << 22),
                    "channel_id": str(CHANNEL),
                    "content": "",
                    "author": user(APP, "doppel", True),
                    "timestamp": "2024-05-01T12:00:00+00:00",
                    "edited_timestamp": None,
                    "tts": False,
                    "mention_everyone": False,
                    "mentions": [],
                    "mention_roles": [],
                    "attachments": [],
                    "embeds": [],
                    "pinned": False,
                    "type": 0,
                    "flags": 0,
                    "components": [],
                    "webhook_id": str(APP),
                }
            )
        return json_response({})

    async def send(self, op: int, data: Any, event: str | None = None) -> None:
        payload: dict[str, Any] = {"op": op, "d": data, "s": None, "t": event}
        if op == 0:
            self.seq += 1
            payload["s"] = self.seq
        await self.ws.send_str(json.dumps(payload))

    async def gateway(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        await self.send(10, {"heartbeat_interval": 41250})
        while True:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                self.close_codes.append(msg.data if msg.type == WSMsgType.CLOSE else None)
                break
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["op"] == 1:
                await self.send(11, None)
            elif frame["op"] == 2:
                await self.send(
                    0,
                    {
                        "v": 10,
                        "user": user(APP, "doppel", True),
                        "guilds": [],
                        "session_id": "s1",
                        "resume_gateway_url": "ws://unused",
                        "application": {"id": str(APP), "flags": 0},
                    },
                    "READY",
                )
                await self.send(
                    0,
                    {
                        "id": str(GUILD),
                        "name": "guild",
                        "owner_id": "1",
                        "unavailable": False,
                        "member_count": 2,
                        "roles": [
                            {
                                "id": str(GUILD),
                                "name": "@everyone",
                                "permissions": "0",
                                "position": 0,
                                "color": 0,
                                "hoist": False,
                                "managed": False,
                                "mentionable": False,
                            }
                        ],
                        "channels": [
                            {
                                "id": str(CHANNEL),
                                "type": 0,
                                "name": "general",
                                "position": 0,
                                "permission_overwrites": [],
                                "nsfw": False,
                                "parent_id": None,
                            }
                        ],
                        "members": [],
                        "emojis": [],
                        "stickers": [],
                        "features": [],
                        "threads": [],
                    },
                    "GUILD_CREATE",
                )
                self.identified.set()
        await ws.close()
        return ws

    async def persona_train(self, admin_perms: str) -> None:
        """An admin runs `/persona train member:@alice`."""
        alice = member(ALICE, "alice", "0")
        data = {
            "id": "1",
            "name": "persona",
            "type": 1,
            "options": [
                {"type": 1, "name": "train", "options": [{"type": 6, "name": "member", "value": str(ALICE)}]}
            ],
            "resolved": {
                "users": {str(ALICE): alice["user"]},
                "members": {str(ALICE): {k: v for k, v in alice.items() if k != "user"}},
            },
        }
        await self.send(
            0,
            {
                "id": "777",
                "application_id": str(APP),
                "type": 2,
                "token": "tok",
                "version": 1,
                "guild_id": str(GUILD),
                "channel_id": str(CHANNEL),
                "member": member(ADMIN, "admin", admin_perms),
                "app_permissions": admin_perms,
                "locale": "en-US",
                "guild_locale": "en-US",
                "entitlements": [],
                "context": 0,
                "authorizing_integration_owners": {"0": str(GUILD)},
                "attachment_size_limit": 10485760,
                "data": data,
                "channel": {
                    "id": str(CHANNEL),
                    "type": 0,
                    "guild_id": str(GUILD),
                    "name": "general",
                    "position": 0,
                    "permission_overwrites": [],
                    "nsfw": False,
                    "parent_id": None,
                },
            },
            "INTERACTION_CREATE",
        )


async def _seed(home: Path) -> None:
    """Alice opted in, with enough messages to train."""
    from consent.service import ConsentService
    from core.settings import Settings
    from data.records import Member, Message
    from data.store import Store

    settings = Settings.load(env={"DOPPEL_HOME": str(home)})
    async with Store.open(settings) as store:
        await ConsentService(store).grant([str(ALICE), "2002"], "train", "admin", "cli")
        await store.members.upsert(Member(str(ALICE), "alice", "Alice"))
        t0 = 1_700_000_000.0
        messages = []
        for i in range(60):
            messages.append(
                Message(
                    f"q{i}",
                    str(GUILD),
                    str(CHANNEL),
                    "general",
                    "2002",
                    "bo",
                    t0 + i * 3600,
                    f"anyone up for a game tonight, round {i}?",
                )
            )
            messages.append(
                Message(
                    f"a{i}",
                    str(GUILD),
                    str(CHANNEL),
                    "general",
                    str(ALICE),
                    "alice",
                    t0 + i * 3600 + 30,
                    f"omg yes!!! round {i} is going to be so good haha",
                )
            )
        await store.messages.add_many(messages)


def _job(home: Path) -> tuple[str, str, int | None] | None:
    conn = sqlite3.connect(home / "doppel.sqlite3")
    try:
        row = conn.execute("SELECT id, status, pid FROM jobs ORDER BY created_at DESC LIMIT 1").fetchone()
    finally:
        conn.close()
    return None if row is None else (str(row[0]), str(row[1]), row[2])


def _trainers(job_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "trainer" in cmd and job_id in cmd:
            found.append(proc)
    return found


def test_sigterm_stops_doppel_run_gracefully(doppel_home: Path, tmp_path: Path) -> None:
    import discord
    from aiohttp import web

    from trainer.tinymodel import build_tiny

    # The tiny random llama as the base model: the trainer child starts in seconds and fits any host's memory.
    tiny = build_tiny(tmp_path / "tiny")

    async def scenario() -> None:
        await _seed(doppel_home)
        standin = StandIn()
        runner = web.AppRunner(standin.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        env = {
            **os.environ,
            "DOPPEL_HOME": str(doppel_home),
            "DOPPEL_MASTER_KEY": "",
            "DISCORD_TOKEN": "stand-in",
            "STANDIN_URL": f"http://127.0.0.1:{port}",
            "DOPPEL_TRAINING__CANCEL_GRACE_S": "3",
            "DOPPEL_TRAINING__MIN_FREE_DISK_MB": "1",
            "OMP_NUM_THREADS": "1",
            "DOPPEL_MODEL__BASE_GGUF": str(tiny.gguf_path),
            "DOPPEL_MODEL__BASE_NAME": "tiny",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LAUNCH,
            env=env,
            cwd=str(Path(__file__).parents[2]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            waiter = asyncio.create_task(standin.identified.wait())
            await asyncio.wait(
                {waiter, asyncio.create_task(proc.wait())}, timeout=120, return_when=asyncio.FIRST_COMPLETED
            )
            if not waiter.done():
                waiter.cancel()
                if proc.returncode is None:
                    proc.kill()
                _, err = await proc.communicate()
                raise AssertionError(f"doppel run did not connect: {err.decode()[-3000:]} {standin.posts}")
            await asyncio.sleep(1.0)  # READY and GUILD_CREATE processed
            await standin.persona_train(str(discord.Permissions.all().value))
            job = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                job = _job(doppel_home)
                if job is not None and job[1] == "running" and job[2] and psutil.pid_exists(job[2]):
                    break
                if job is None and any(p.startswith("POST /webhooks/") for p in standin.posts):
                    break  # the command answered without queueing a job: a refusal, shown below
                await asyncio.sleep(0.5)
            assert job is not None and job[1] == "running" and job[2], (
                f"no training child started: {job} {standin.posts}"
            )
            job_id, _, child = job
            assert _trainers(job_id), "the trainer child runs"

            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            took = time.monotonic() - started
            for _ in range(50):  # the stand-in's handler notes the close frame on its own schedule
                if standin.close_codes:
                    break
                await asyncio.sleep(0.1)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await runner.cleanup()

        from bot.main import grace_s
        from core.settings import Settings

        grace = grace_s(
            Settings.load(env={"DOPPEL_HOME": str(doppel_home), "DOPPEL_TRAINING__CANCEL_GRACE_S": "3"})
        )
        assert proc.returncode == 0, err.decode()[-2000:]
        assert took <= grace, f"shutdown took {took:.1f} s, grace {grace} s"
        # A close frame, not a dropped connection, with 1000: the session ends and Discord shows the bot offline
        # at once (4000, what discord.py's waiting reader sends, keeps the session resumable and the bot online).
        assert standin.close_codes == [1000], standin.close_codes
        assert not _trainers(job_id), "no trainer child left behind"
        assert child is not None and not psutil.pid_exists(child)
        log = (doppel_home / "logs" / "doppel.log").read_text(encoding="utf-8")
        assert "SIGTERM received: shutting down" in log and "shutdown complete" in log
        assert "gateway session closed with code 1000" in log
        status = _job(doppel_home)
        assert status is not None and status[1] == "interrupted"  # resumable, checkpointed if it got that far

    asyncio.run(scenario())
