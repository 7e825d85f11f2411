"""Starting and stopping the bot: open the services, connect, close everything on the way out."""

from __future__ import annotations

import logging

import discord

from bot.client import run_bot
from bot.errors import BotError
from bot.services import Services
from doppel.settings import Settings

log = logging.getLogger("doppel.bot")


class LoginRefused(BotError):
    """Discord rejected the token or the intents."""


async def serve(settings: Settings, token: str, *, with_engine: bool = True) -> None:
    """Run the bot until interrupted; maps Discord's login errors to one-line messages."""
    services = await Services.open(settings, with_engine=with_engine)
    try:
        await run_bot(services, token)
    except discord.LoginFailure:
        raise LoginRefused("Discord rejected DISCORD_TOKEN: copy the bot token again from the Developer Portal") from None
    except discord.PrivilegedIntentsRequired:
        raise LoginRefused(
            "enable the Message Content intent for the bot in the Developer Portal (Bot → Privileged Gateway Intents)"
        ) from None
    finally:
        await services.close()
