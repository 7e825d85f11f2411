"""DiscordChatExporter JSON, built: the export header, a message, its author and a reaction, as DCE writes them.

The demo's generated community, the scale benchmark's and the fidelity benchmark's real chat all write exports
that `data.dce_import` reads like a server's own; the shape is declared here once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def author(
    author_id: str, name: str, nickname: str = "", *, is_bot: bool = False, avatar_url: str = ""
) -> dict[str, Any]:
    """A message's author."""
    return {
        "id": author_id,
        "name": name,
        "discriminator": "0000",
        "nickname": nickname or name,
        "color": None,
        "isBot": is_bot,
        "roles": [],
        "avatarUrl": avatar_url,
    }


def reaction(emoji: str, code: str, count: int) -> dict[str, Any]:
    """A Unicode-emoji reaction and how many people gave it."""
    return {
        "emoji": {"id": "", "name": emoji, "code": code, "isAnimated": False, "imageUrl": ""},
        "count": count,
    }


def message(
    message_id: str,
    when: datetime,
    content: str,
    by: dict[str, Any],
    *,
    reply_to: tuple[str, str, str] | None = None,
    reactions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A message; `reply_to` is (message id, channel id, guild id) of the message it answers."""
    msg: dict[str, Any] = {
        "id": message_id,
        "type": "Reply" if reply_to else "Default",
        "timestamp": when.isoformat(timespec="milliseconds"),
        "timestampEdited": None,
        "callEndedTimestamp": None,
        "isPinned": False,
        "content": content,
        "author": by,
        "attachments": [],
        "embeds": [],
        "stickers": [],
        "reactions": reactions or [],
        "mentions": [],
        "inlineEmojis": [],
    }
    if reply_to:
        # DCE 2.47+ names the kind of reference ("Default" for a reply, "Forward" for a forwarded message).
        msg["reference"] = {
            "type": "Default",
            "messageId": reply_to[0],
            "channelId": reply_to[1],
            "guildId": reply_to[2],
        }
    return msg


def header(
    guild_id: str, guild_name: str, channel_id: str, channel_name: str, category: str, exported_at: datetime
) -> dict[str, Any]:
    """An export's guild and channel, without its messages."""
    return {
        "guild": {"id": guild_id, "name": guild_name, "iconUrl": ""},
        "channel": {
            "id": channel_id,
            "type": "GuildTextChat",
            "categoryId": "1",
            "category": category,
            "name": channel_name,
            "topic": None,
        },
        "dateRange": {"after": None, "before": None},
        "exportedAt": exported_at.isoformat(),
    }


def export(head: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole export: the header and its messages."""
    return {**head, "messages": messages, "messageCount": len(messages)}
