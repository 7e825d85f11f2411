"""Errors of consent management and the erasure cascade."""

from __future__ import annotations

from core.errors import UserFacingError


class ConsentError(UserFacingError):
    """An invalid consent request (unknown scope or channel, malformed member id)."""


class ErasureError(UserFacingError):
    """Some part of the erasure cascade failed; the others ran."""
