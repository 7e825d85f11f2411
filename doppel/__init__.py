"""Doppel: consenting members' AI personas for a Discord community."""

from __future__ import annotations

__version__ = "0.1.0"
