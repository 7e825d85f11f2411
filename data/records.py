"""Plain records passed between the store and the other packages (decrypted, in memory only)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Member:
    """A Discord member the store knows about."""

    id: str
    name: str
    display_name: str
    avatar_url: str | None = None
    is_bot: bool = False


@dataclass(frozen=True)
class Message:
    """One stored message, content decrypted. Timestamps are UTC epoch seconds."""

    id: str
    guild_id: str | None
    channel_id: str
    channel_name: str | None
    author_id: str
    author_name: str
    created_at: float
    content: str
    edited_at: float | None = None
    reply_to: str | None = None
    reactions: dict[str, int] = field(default_factory=dict)
    attachments: int = 0
    source: str = "import"


@dataclass(frozen=True)
class GuildSettings:
    """Per-guild switches: recording is off until an admin turns it on and acknowledges Discord's terms."""

    guild_id: str
    recording_enabled: bool = False
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    channel_allowlist: tuple[str, ...] = ()
    persona_channels: tuple[str, ...] = ()
