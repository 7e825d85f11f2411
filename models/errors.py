"""Errors of the model registry; all are read by people (CLI, bot), so all are `UserFacingError`s."""

from __future__ import annotations

from core.errors import GGUFFileError, UserFacingError


class RegistryError(UserFacingError):
    """A registry operation could not be done."""


class ModelFileError(RegistryError, GGUFFileError):
    """A base model file is missing or is not a usable GGUF."""


class UnknownBaseModelError(RegistryError):
    """No base model is registered under that name."""


class AdapterNotFoundError(RegistryError):
    """No adapter (or adapter version) matches."""


class ArtifactError(RegistryError):
    """A trained artifact is incomplete or inconsistent and cannot be published."""
