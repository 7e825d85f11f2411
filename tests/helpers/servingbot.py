"""A second process serving personas as the bot does, without Discord: `python -m tests.helpers.servingbot`.

It opens the bot's own `Services` (store, engine from `[inference] backend`, the serving place) and answers JSON
lines on stdin, one JSON line each on stdout:
  {"op": "reply", "member": "10"}  -> {"text": ..., "adapter": ...} or {"error": ...}, as `PersonaChat` builds it
  {"op": "held"}                   -> {"adapters": [paths the in-process engine holds loaded]}
  {"op": "quit"}
It prints {"ready": true} once it serves.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from core.chatformat import Utterance
from core.settings import Settings

CONTEXT = [Utterance("20", "Bob", "anyone up for pizza tonight?"), Utterance("30", "Carol", "yes! where?")]


async def answer(services: Any, op: dict[str, Any]) -> dict[str, Any]:
    from inference.requests import GenParams, PersonaRequest

    if op["op"] == "held":
        engine = services.engine
        pool = getattr(engine, "pool", None)
        return {"adapters": [p for base in (pool.held() if pool else []) for p in base.adapters.loaded()]}
    member = str(op["member"])
    # What the bot reads at each reply (bot/chat.py persona_request): consent and the active adapter, now.
    if "chat" not in await services.consent.scopes(member):
        return {"error": f"{member} has not allowed chat"}
    adapter = await services.registry.servable(member)
    if adapter is None:
        return {"error": f"{member} has no trained persona"}
    gguf = adapter.gguf_path
    request = PersonaRequest(member, f"m{member}", "general", "adapter", ((str(gguf), 1.0),), "g1")
    params = GenParams(max_tokens=int(op.get("max_tokens", 12)), temperature=0.0)
    try:
        text = "".join([chunk async for chunk in services.reply(request, CONTEXT, params)])
    except Exception as exc:  # the bot answers these in one line; the test reads which
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"text": text, "adapter": str(gguf)}


async def main() -> None:
    from bot.services import Services
    from doppel.erasure import erasure_parts

    services = await Services.open(Settings.load(), erasure_parts(), with_supervisor=False)
    try:
        print(
            json.dumps({"ready": True, "place": services.place.label if services.place else None}), flush=True
        )
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            op = json.loads(line)
            if op["op"] == "quit":
                return
            print(json.dumps(await answer(services, op)), flush=True)
    finally:
        await services.close()


if __name__ == "__main__":
    asyncio.run(main())
