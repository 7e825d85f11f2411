"""Training recipes: each one reads top to bottom, setup -> train -> save."""

from __future__ import annotations
