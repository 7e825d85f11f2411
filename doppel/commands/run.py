"""`doppel run`: the Discord bot, with DISCORD_TOKEN from the environment (never logged)."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from core.errors import UserFacingError
from core.settings import Settings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run the Discord bot (needs DISCORD_TOKEN; see docs/discord-setup.md)")
    p.add_argument(
        "--no-sync", action="store_true", help="do not sync slash commands with Discord at startup"
    )
    p.add_argument(
        "--no-engine", action="store_true", help="do not load the inference engine (no persona chat)"
    )
    return p


def run(args: argparse.Namespace, settings: Settings) -> Any:
    token = (settings.discord_token or "").strip()
    if not token:
        raise UserFacingError(
            "DISCORD_TOKEN is not set: create a bot in Discord's Developer Portal and export its token "
            "(see docs/discord-setup.md)"
        )
    if importlib.util.find_spec("discord") is None:
        raise UserFacingError("discord.py is not installed: pip install 'doppel[bot]'")
    if args.no_sync:
        import dataclasses

        settings = dataclasses.replace(settings, bot=dataclasses.replace(settings.bot, sync_commands=False))
    from bot.main import run_forever
    from doppel.erasure import erasure_parts

    # SIGTERM (systemd, Docker) and SIGINT (Ctrl-C) take the same bounded, graceful shutdown; both exit 0.
    run_forever(settings, token, erasure=erasure_parts(), with_engine=not args.no_engine)
    return None
