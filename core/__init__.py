"""The core every layer may use: settings, error roots, the chat format, the GGUF header reader; it imports none of them."""

from __future__ import annotations
