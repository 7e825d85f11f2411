"""`doppel chat USER_ID`: one persona reply, or a REPL without --message."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from core.errors import UserFacingError
from core.settings import Settings

if TYPE_CHECKING:
    from inference.engine import Engine
    from inference.places import ServingPlace
    from inference.requests import GenParams, PersonaRequest
    from inference.server import ServerEngine


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from inference.requests import CHOICES

    p = sub.add_parser("chat", help="talk to a member's persona (one reply, or a REPL without --message)")
    p.add_argument("user_id", help="Discord id of the member whose persona answers")
    p.add_argument("--message", "-m", help="one message to answer (no REPL)")
    p.add_argument("--temperature", "-t", type=float, default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible replies")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length limit in tokens")
    p.add_argument(
        "--mode",
        choices=CHOICES,
        default="auto",
        help="auto: the active adapter with retrieval of the member's messages if any are stored, else retrieval, else base",
    )
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    if args.message is not None and not args.message.strip():
        raise UserFacingError("--message is empty")
    return asyncio.run(_chat(args, settings))


async def _resolve(store: Any, settings: Settings, user_id: str, mode: str) -> tuple[str, str, str | None]:
    """(display name, mode, adapter path) for the member, refusing without `chat` consent."""
    from consent.service import ConsentService
    from inference.errors import ChatNotAllowedError
    from inference.requests import resolve_mode, uses_adapters, uses_retrieval
    from inference.retrieval import MODEL_NAME  # noqa: F401 - fails early if the inference extra is missing

    if "chat" not in await ConsentService(store).scopes(user_id):
        raise ChatNotAllowedError(f"member {user_id} has not consented to chat: their persona cannot answer")
    member = await store.members.get(user_id)
    name = (member.display_name or member.name) if member else user_id
    adapter = None
    try:
        from models.registry import Registry

        active = await Registry(store, settings).active(user_id)
        if active is not None and active.gguf_path.is_file():
            adapter = str(active.gguf_path)
    except ImportError:
        adapter = None
    has_messages = await store.messages.count(user_id) > 0
    mode = resolve_mode(mode, has_adapter=adapter is not None, has_messages=has_messages)
    if uses_adapters(mode) and adapter is None:
        raise UserFacingError(
            f"member {user_id} has no active adapter yet: train one or use --mode retrieval/base"
        )
    if uses_retrieval(mode) and not has_messages:
        raise UserFacingError(f"member {user_id} has no stored messages: the retrieval persona needs some")
    return name, mode, adapter


async def _chat(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from data.store import Store
    from inference.places import ServingPlace
    from inference.requests import GenParams, PersonaRequest, uses_adapters
    from inference.retrieval import Retriever
    from inference.server import make_engine

    async def persona_now() -> tuple[PersonaRequest, str, str | None]:
        # Read again before every reply: a `doppel forget` or a withdrawn consent elsewhere ends this chat.
        name, mode, adapter = await _resolve(store, settings, args.user_id, args.mode)
        persona = PersonaRequest(
            member_id=args.user_id,
            name=name,
            channel_name="doppel-cli",
            mode=mode,  # type: ignore[arg-type]
            adapters=((adapter, 1.0),) if adapter and uses_adapters(mode) else (),
            guild_id="cli",
        )
        return persona, mode, adapter

    async with Store.open(settings) as store:
        persona, mode, adapter = await persona_now()
        name = persona.name
        cfg = settings.inference
        params = GenParams(
            max_tokens=args.max_tokens or cfg.max_tokens,
            temperature=cfg.temperature if args.temperature is None else args.temperature,
            seed=args.seed,
        )
        params.validate()
        replies: list[str] = []
        # [inference] backend: llama.cpp in this process, or a persona server (inference/server.py).
        async with make_engine(settings, retriever=Retriever(store, settings)) as engine:
            # This process serves a persona too: an erasure from another process reaches it (inference/places.py).
            place = ServingPlace(store, "engine", f"doppel chat's persona engine (pid {os.getpid()})", engine)
            await place.start()
            try:
                await _converse(args, engine, place, persona_now, params, replies)
            finally:
                await place.close()
    return {
        "member": args.user_id,
        "name": name,
        "mode": mode,
        "adapter": adapter,
        "reply": replies[-1] if replies else "",
        "replies": replies,
    }


async def _converse(
    args: argparse.Namespace,
    engine: Engine | ServerEngine,
    place: ServingPlace,
    persona_now: Callable[[], Awaitable[tuple[PersonaRequest, str, str | None]]],
    params: GenParams,
    replies: list[str],
) -> None:
    """The REPL (or the one message): each reply after acting on erasures and reading consent again."""
    from core.chatformat import Utterance

    history: list[Utterance] = []
    stream_out = not getattr(args, "json", False)
    messages = [args.message] if args.message is not None else None
    if messages is None and stream_out:
        persona, mode, _ = await persona_now()
        print(f"chatting with {persona.name} ({mode}); an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        if messages is not None:
            text = messages.pop(0) if messages else None
        else:
            # In a thread: while the prompt waits, this process still answers erasures from elsewhere.
            text = await asyncio.to_thread(_read_line)
        if not text:
            return
        history.append(Utterance("cli", "You", text))
        await place.sync()
        persona, _, _ = await persona_now()
        chunks = []
        if stream_out and args.message is None:
            print(f"{persona.name}: ", end="", flush=True)
        async for chunk in engine.reply(persona, history, params):
            chunks.append(chunk)
            if stream_out:
                print(chunk, end="", flush=True)
        if stream_out:
            print(flush=True)
        reply = "".join(chunks)
        replies.append(reply)
        history.append(Utterance(args.user_id, persona.name, reply))
        if args.message is not None:
            return


def _read_line() -> str | None:
    try:
        line = input("you: ")
    except EOFError:
        return None
    return line.strip() or None
