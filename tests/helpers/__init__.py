"""Helpers shared by the test packages, imported as modules (`from tests.helpers import supervision`)."""

from __future__ import annotations
