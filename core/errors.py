"""Exception roots shared by every package."""

from __future__ import annotations


class DoppelError(Exception):
    """Base of every error Doppel raises on purpose."""


class UserFacingError(DoppelError):
    """An error whose message a person may read as-is (CLI stderr, ephemeral Discord reply)."""


class ConfigError(UserFacingError):
    """The settings file or environment is invalid."""


class GGUFFileError(UserFacingError):
    """A model file is missing or is not a readable GGUF (raised by the core header reader)."""
