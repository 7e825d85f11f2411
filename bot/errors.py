"""Errors the bot raises on purpose; each message is shown to the member as-is."""

from __future__ import annotations

from core.errors import UserFacingError


class BotError(UserFacingError):
    """Base of the bot's own user-facing errors."""


class NotAllowed(BotError):
    """The member lacks the permission or role a command needs."""


class ConsentMissing(BotError):
    """The member whose data or persona is involved has not granted the needed scope."""


class RecordingOff(BotError):
    """Recording has not been turned on (and acknowledged) in this server."""


class RateLimited(BotError):
    """A per-member or per-channel cooldown is still running."""


class NotAvailable(BotError):
    """Something the command needs is missing (no persona trained, no export found, wrong channel type)."""


class BadUpload(BotError):
    """An uploaded file is not a DiscordChatExporter JSON export the member may import."""
