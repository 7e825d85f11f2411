"""Discord API payloads the bot tests' stand-ins send (users and guild members), built one way for all of them."""

from __future__ import annotations

from typing import Any

import discord

MEMBER_PERMS = str(
    discord.Permissions(send_messages=True, read_message_history=True, view_channel=True).value
)


def user(uid: int, name: str, bot: bool = False) -> dict[str, Any]:
    """A user object."""
    return {
        "id": str(uid),
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
    }


def member(uid: int, name: str, perms: str = MEMBER_PERMS, bot: bool = False) -> dict[str, Any]:
    """A guild member object with resolved permissions."""
    return {
        "user": user(uid, name, bot),
        "roles": [],
        "joined_at": "2024-01-01T00:00:00+00:00",
        "deaf": False,
        "mute": False,
        "flags": 0,
        "permissions": perms,
        "nick": None,
    }
