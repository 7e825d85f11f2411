"""The bot on the server backend: a persona server that is down is a one-line answer, and the bot goes on."""

from __future__ import annotations

import asyncio
from typing import Any

from inference.server import ServerEngine
from tests.helpers.llama_server import free_port

ALICE, BOB = 111, 222


def test_a_down_persona_server_is_one_line_and_the_bot_keeps_serving(bot_world: Any, settings: Any) -> None:
    async def scenario() -> None:
        engine = ServerEngine(settings, url=f"http://127.0.0.1:{free_port()}", flavour="llama.cpp")
        await engine.start()
        try:
            async with bot_world(engine=engine) as (h, services):
                await h.click("doppel:consent:train", ALICE)
                await h.click("doppel:consent:chat", ALICE)
                await h.active_adapter(services, ALICE)
                h.fake.calls.clear()
                await h.command(
                    "persona chat",
                    BOB,
                    member=(6, str(ALICE)),
                    message="hi there",
                    resolved=h.resolved(ALICE),
                )
                said = h.sent_texts()[-1]
                assert "is not reachable" in said and "\n" not in said.strip(), said
                assert not [c for c in h.fake.calls if c.path.startswith("/webhooks/7777/")]
                # The bot still handles everything else.
                await h.click("doppel:consent:train", BOB)
                assert "train" in await services.consent.scopes(str(BOB))
        finally:
            await engine.close()

    asyncio.run(scenario())
