"""Errors raised by the store, the crypto layer and the DiscordChatExporter importer."""

from __future__ import annotations

from core.errors import DoppelError, UserFacingError


class StoreError(DoppelError):
    """The database is in a state the store cannot work with."""


class MasterKeyError(UserFacingError):
    """The master key is missing, malformed, or does not open the stored member keys."""


class InvalidMemberIdError(UserFacingError):
    """A member id that is not a Discord snowflake (a string of digits)."""


class ImportFileError(UserFacingError):
    """An export file could not be imported; the store was left as it was before that file."""


class ExportError(UserFacingError):
    """A member data export could not be written."""
