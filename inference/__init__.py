"""Persona serving on llama.cpp: one base model, LoRA adapters swapped per request, a fair bounded queue.

`Engine` (engine.py) is the entry point; `PersonaRequest`/`GenParams` (requests.py) say what to generate.
Nothing here imports llama_cpp, torch or sentence-transformers until it is used.
"""

from __future__ import annotations

from inference.engine import Engine, ReplyStream
from inference.errors import BusyError
from inference.requests import GenParams, PersonaRequest

__all__ = ["BusyError", "Engine", "GenParams", "PersonaRequest", "ReplyStream"]
