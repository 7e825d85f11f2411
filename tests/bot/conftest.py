"""A Discord without network: real discord.py objects built from gateway payloads; only HTTP is faked."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from tests.helpers.discord_payloads import MEMBER_PERMS, member, user
from tests.helpers.rows import seed_adapter

GUILD, TEXT, OTHER, PERSONA_CH, APP = 1000, 2000, 2001, 2002, 9000
ADMIN_PERMS = str(discord.Permissions.all().value)
_ids = itertools.count(10_000_000)


def snowflake() -> str:
    return str(next(_ids) << 22)


def channel(cid: int, name: str) -> dict[str, Any]:
    return {
        "id": str(cid),
        "type": 0,
        "guild_id": str(GUILD),
        "name": name,
        "position": 0,
        "permission_overwrites": [],
        "nsfw": False,
        "parent_id": None,
    }


@dataclass
class Call:
    """One HTTP request the bot made."""

    method: str
    path: str
    payload: dict[str, Any] | None
    files: int = 0
    response: Any = None


@dataclass
class FakeDiscord:
    """Records every request (bot HTTP and webhook/interaction endpoints) and answers like Discord would."""

    calls: list[Call] = field(default_factory=list)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dm_forbidden: bool = False
    cdn: bytes = b""
    events: list[str] = field(default_factory=list)

    def record(self, method: str, url: str, payload: Any, files: Any = None) -> Call:
        path = url.split("/api/v10", 1)[-1]
        call = Call(method, path, payload, len(files or []))
        self.calls.append(call)
        self.events.append(f"http {method} {path}")
        return call

    def message(
        self,
        content: str = "",
        cid: str = str(TEXT),
        author: dict[str, Any] | None = None,
        webhook_id: str | None = None,
        mid: str | None = None,
    ) -> dict[str, Any]:
        data = {
            "id": mid or snowflake(),
            "channel_id": cid,
            "content": content or "",
            "author": author or user(APP, "doppel", bot=True),
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
        }
        if webhook_id:
            data["webhook_id"] = webhook_id
        return data

    async def http_request(self, route: Any, **kwargs: Any) -> Any:
        payload = kwargs.get("json")
        form = kwargs.get("form")
        if payload is None and form:
            for part in form:
                if part.get("name") == "payload_json":
                    payload = json.loads(part["value"])
        self.record(route.method, route.url, payload, kwargs.get("files"))
        path, method = route.path, route.method
        cid = str(route.channel_id) if route.channel_id else str(TEXT)
        if path.endswith("/webhooks") and method == "GET":
            return []
        if path.endswith("/webhooks") and method == "POST":
            return {
                "id": "7777",
                "type": 1,
                "token": "hooktoken",
                "name": payload["name"],
                "channel_id": cid,
                "guild_id": str(GUILD),
                "user": user(APP, "doppel", bot=True),
                "application_id": str(APP),
            }
        if path.endswith("/messages") and method == "GET":
            params = kwargs.get("params") or {}
            limit = int(params.get("limit", 100))
            after, before = int(params.get("after", 0)), int(params.get("before", 1 << 63))
            found = sorted(
                (m for m in self.history.get(cid, []) if after < int(m["id"]) < before),
                key=lambda m: int(m["id"]),
            )
            page = found[:limit] if "after" in params else found[-limit:]
            return list(reversed(page))
        if path.endswith("/messages") and method == "POST":
            if cid == "5555" and self.dm_forbidden:
                raise discord.Forbidden(
                    _Resp(403), {"code": 50007, "message": "Cannot send messages to this user"}
                )
            return self.message((payload or {}).get("content") or "", cid)
        if path.endswith("/messages/{message_id}") and method == "PATCH":
            return self.message((payload or {}).get("content") or "", cid, mid=route.url.rsplit("/", 1)[-1])
        if path == "/users/@me/channels":
            if self.dm_forbidden:
                raise discord.Forbidden(
                    _Resp(403), {"code": 50007, "message": "Cannot send messages to this user"}
                )
            return {"id": "5555", "type": 1, "recipients": [user(int(payload["recipient_id"]), "someone")]}
        if path.endswith("/members/{member_id}") and method == "GET":
            uid = int(route.url.rsplit("/", 1)[-1])
            return member(uid, f"user{uid}")
        if "/commands" in path:
            return []
        return None

    async def cdn_get(self, url: str) -> bytes:
        return self.cdn


class _Resp:
    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "Forbidden"


class RecordingAdapter(AsyncWebhookAdapter):
    """Webhook and interaction endpoints (callback, followups, webhook messages) answered locally."""

    def __init__(self, fake: FakeDiscord) -> None:
        super().__init__()
        self.fake = fake

    async def request(
        self,
        route: Any,
        session: Any = None,
        *,
        payload: Any = None,
        multipart: Any = None,
        files: Any = None,
        **kwargs: Any,
    ) -> Any:
        if payload is None and multipart:
            for part in multipart:
                if part.get("name") == "payload_json":
                    payload = json.loads(part["value"])
        call = self.fake.record(route.method, route.url, payload, files)
        if route.url.endswith("/callback"):
            return {"interaction": {"id": str(route.webhook_id), "type": 2}}
        if route.method in ("POST", "PATCH", "GET"):
            content = (payload or {}).get("content") or ""
            mid = route.url.rsplit("/", 1)[-1] if route.method == "PATCH" else None
            if mid == "@original":
                mid = snowflake()
            call.response = self.fake.message(content, webhook_id="7777", mid=mid)
            return call.response
        return None


class Harness:
    """A DoppelBot wired to real services and a fake Discord; dispatches gateway payloads and waits for handlers."""

    ADMIN, GUILD, TEXT, OTHER, PERSONA, APP = ADMIN_PERMS, GUILD, TEXT, OTHER, PERSONA_CH, APP
    user = staticmethod(user)
    member = staticmethod(member)

    def __init__(self, bot: Any, fake: FakeDiscord) -> None:
        self.bot = bot
        self.fake = fake
        self.state = bot._connection

    def resolved(self, uid: int) -> dict[str, Any]:
        """The `resolved` block of an interaction payload whose option names member `uid`."""
        m = member(uid, f"user{uid}")
        return {
            "users": {str(uid): m["user"]},
            "members": {str(uid): {k: v for k, v in m.items() if k != "user"}},
        }

    @staticmethod
    async def active_adapter(services: Any, uid: int) -> Path:
        """Register an active adapter `a<uid>` for member `uid`; returns its adapter.gguf path."""
        folder = (
            services.settings.adapters_dir / str(uid) / "1"
        )  # inside DOPPEL_HOME, where erasure may delete it
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter.gguf").write_bytes(b"GGUF")  # the engine is scripted: the file only has to exist
        await seed_adapter(
            services.store,
            id=f"a{uid}",
            member_id=str(uid),
            base_model="smollm2-135m",
            version=1,
            status="active",
            path=str(folder),
            created_at=1.0,
        )
        return folder / "adapter.gguf"

    async def settle(self) -> None:
        """Let every task the dispatch started run to completion (watchers excepted)."""
        for _ in range(50):
            await asyncio.sleep(0)
            pending = [
                t
                for t in asyncio.all_tasks()
                if t is not asyncio.current_task()
                and not any(k in repr(t.get_coro()) for k in ("watch", "timeout_task"))
            ]
            if not pending:
                return
            done, still = await asyncio.wait(pending, timeout=5)
            if still:
                raise AssertionError(f"handlers still running after 5 s: {still}")

    def _interaction(
        self,
        kind: int,
        data: dict[str, Any],
        uid: int,
        perms: str,
        cid: int = TEXT,
        message: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload = {
            "id": snowflake(),
            "application_id": str(APP),
            "type": kind,
            "token": "tok",
            "version": 1,
            "guild_id": str(GUILD),
            "channel_id": str(cid),
            "channel": channel(cid, "general"),
            "member": member(uid, f"user{uid}", perms),
            "app_permissions": ADMIN_PERMS,
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD)},
            "context": 0,
            "attachment_size_limit": 10485760,
            "data": data,
        }
        if message is not None:
            payload["message"] = message
        return payload

    async def command(
        self,
        path: str,
        uid: int,
        *,
        perms: str = MEMBER_PERMS,
        cid: int = TEXT,
        resolved: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        """Invoke `/group sub` with options (ints, strs, bools; users/channels/attachments as ids + `resolved`)."""
        group, sub = path.split()
        types = {bool: 5, int: 4, str: 3}
        opts = []
        for name, value in options.items():
            kind, value = (value[0], value[1]) if isinstance(value, tuple) else (types[type(value)], value)
            opts.append({"type": kind, "name": name, "value": value})
        data = {
            "id": snowflake(),
            "name": group,
            "type": 1,
            "options": [{"type": 1, "name": sub, "options": opts}],
        }
        if resolved:
            data["resolved"] = resolved
        self.state.parse_interaction_create(self._interaction(2, data, uid, perms, cid))
        await self.settle()

    async def click(
        self,
        custom_id: str,
        uid: int,
        *,
        perms: str = MEMBER_PERMS,
        ephemeral: bool = False,
        mid: str | None = None,
    ) -> None:
        """Press a button with `custom_id` on a message (ephemeral or not; `mid` for views bound to a message)."""
        msg = self.fake.message("panel", mid=mid)
        msg["flags"] = 64 if ephemeral else 0
        msg["components"] = [
            {"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": custom_id}]}
        ]
        data = {"custom_id": custom_id, "component_type": 2}
        self.state.parse_interaction_create(self._interaction(3, data, uid, perms, message=msg))
        await self.settle()

    async def say(
        self,
        uid: int,
        content: str,
        *,
        cid: int = TEXT,
        bot: bool = False,
        webhook: bool = False,
        mid: str | None = None,
        reference: str | None = None,
        mentions: Sequence[dict[str, Any]] = (),
    ) -> str:
        """A MESSAGE_CREATE from the gateway; returns the message id."""
        data = self.fake.message(
            content,
            str(cid),
            author=user(uid, f"user{uid}", bot),
            mid=mid,
            webhook_id="4242" if webhook else None,
        )
        data["guild_id"] = str(GUILD)
        if not webhook:
            data["member"] = {k: v for k, v in member(uid, f"user{uid}").items() if k != "user"}
        data["mentions"] = list(mentions)
        if reference:
            data["message_reference"] = {
                "message_id": reference,
                "channel_id": str(cid),
                "guild_id": str(GUILD),
            }
            data["type"] = 19
        self.state.parse_message_create(data)
        await self.settle()
        return str(data["id"])

    def responses(self) -> list[Call]:
        return [c for c in self.fake.calls if "/interactions/" in c.path or f"/webhooks/{APP}/tok" in c.path]

    def first_response_type(self) -> int | None:
        calls = self.responses()
        return calls[0].payload["type"] if calls and calls[0].payload else None

    def sent_texts(self) -> list[str]:
        texts = []
        for c in self.fake.calls:
            if isinstance(c.payload, dict):
                body = c.payload.get("data") if isinstance(c.payload.get("data"), dict) else c.payload
                if body.get("content"):
                    texts.append(str(body["content"]))
        return texts


class FakeEngine:
    """A scripted engine (like llm's MockModel): `enqueue` chunks; records each request."""

    def __init__(self) -> None:
        self.queue: list[list[str]] = []
        self.requests: list[tuple[Any, Any, Any]] = []
        self.forgotten: list[str] = []

    def enqueue(self, chunks: Sequence[str]) -> None:
        self.queue.append(list(chunks))

    async def reply(self, persona: Any, context: Any, params: Any) -> AsyncIterator[str]:
        self.requests.append((persona, list(context), params))
        for chunk in self.queue.pop(0) if self.queue else ["..."]:
            yield chunk

    def forget(self, member_id: str) -> None:
        self.forgotten.append(member_id)

    async def let_go(self, member_id: str, doomed: Any) -> Any:
        from inference.places import LetGo

        self.forgotten.append(member_id)
        return LetGo(False, True)

    async def close(self) -> None:
        return None


@pytest.fixture
def bot_world(settings: Any) -> Any:
    """`async with bot_world() as (harness, services)`: real Store + ConsentService in tmp DOPPEL_HOME, fake Discord."""
    import contextlib
    import dataclasses

    from bot.client import DoppelBot
    from bot.services import Services
    from consent.service import ConsentService
    from data.store import Store
    from doppel.erasure import erasure_parts

    fast = dataclasses.replace(settings, bot=dataclasses.replace(settings.bot, backfill_pause_s=0.0))

    @contextlib.asynccontextmanager
    async def world(**extra: Any) -> AsyncIterator[tuple[Harness, Services]]:
        store = await Store.open(fast)
        engine = extra.pop("engine", None) or FakeEngine()  # a real engine where a test passes one
        parts = erasure_parts()
        services = Services(
            settings=fast,
            store=store,
            consent=ConsentService(store, parts),
            erasure=parts,
            engine=engine,
            **extra,
        )
        fake = FakeDiscord()
        token = async_context.set(RecordingAdapter(fake))
        bot = DoppelBot(services)
        bot.http.request = fake.http_request  # type: ignore[method-assign]
        bot.http.get_from_cdn = fake.cdn_get  # type: ignore[method-assign]
        state = bot._connection
        state.application_id = APP
        state.user = discord.ClientUser(state=state, data=user(APP, "doppel", bot=True))
        await bot._async_setup_hook()
        await bot.setup_hook()
        state._add_guild_from_data(
            {
                "id": str(GUILD),
                "name": "guild",
                "owner_id": "1",
                "roles": [
                    {
                        "id": str(GUILD),
                        "name": "@everyone",
                        "permissions": MEMBER_PERMS,
                        "position": 0,
                        "color": 0,
                        "hoist": False,
                        "managed": False,
                        "mentionable": False,
                    }
                ],
                "channels": [
                    channel(TEXT, "general"),
                    channel(OTHER, "offtopic"),
                    channel(PERSONA_CH, "personas"),
                ],
                "members": [member(APP, "doppel", ADMIN_PERMS, bot=True)],
                "emojis": [],
                "stickers": [],
                "features": [],
                "member_count": 3,
            }
        )
        try:
            yield Harness(bot, fake), services
        finally:
            for task in asyncio.all_tasks():
                if "watch" in repr(task.get_coro()):
                    task.cancel()
            await asyncio.sleep(0)
            await services.store.close()
            async_context.reset(token)

    return world
