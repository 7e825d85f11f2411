"""What a caller asks the engine for: a persona, its adapter set and generation parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from core.settings import PERSONA_AUTO, PERSONA_CHOICES, PERSONA_MODES
from inference.errors import RequestError

Mode = Literal["base", "adapter", "adapter+retrieval", "retrieval"]
# Declared once in the settings ([bot] persona_mode offers them): the modes, and what a caller may ask for, a mode
# or `auto`, the one that measured best for what the member has (resolve_mode).
MODES: tuple[str, ...] = PERSONA_MODES
AUTO = PERSONA_AUTO
CHOICES: tuple[str, ...] = PERSONA_CHOICES


# What `auto` serves, in words (the bot's report says it): declared beside the rule that decides it.
AUTO_MEANING = "the adapter plus the member's own messages most like the conversation, where both exist"


def uses_adapters(mode: str) -> bool:
    """Whether a mode generates with the member's adapter."""
    return mode in ("adapter", "adapter+retrieval")


def uses_retrieval(mode: str) -> bool:
    """Whether a mode shows the member's own messages most like the conversation."""
    return mode in ("retrieval", "adapter+retrieval")


def resolve_mode(requested: str, *, has_adapter: bool, has_messages: bool) -> Mode:
    """The mode to serve: `requested`, or for `auto` the hybrid where the member has both an adapter and messages.

    Style from the adapter, memory from the member's own messages: the hybrid attributed most replies to the member
    in every fidelity run (BENCHMARKS.md, runs F and H: 85.6% and 84.9% against 71.7% and 74.8% for the adapter).
    """
    if requested not in CHOICES:
        raise RequestError(f"unknown persona mode {requested!r} (expected one of {', '.join(CHOICES)})")
    if requested != AUTO:
        return requested  # type: ignore[return-value]
    if has_adapter:
        return "adapter+retrieval" if has_messages else "adapter"
    return "retrieval" if has_messages else "base"


@dataclass(frozen=True)
class PersonaRequest:
    """Who speaks: the member, how they are shown, and which adapters (path, weight) make their voice."""

    member_id: str
    name: str
    channel_name: str | None = None
    mode: Mode = "base"
    adapters: tuple[tuple[str, float], ...] = ()
    guild_id: str | None = None

    def validate(self) -> None:
        """Raise RequestError for a request the engine cannot serve."""
        if self.mode not in MODES:
            raise RequestError(f"unknown persona mode {self.mode!r} (expected one of {', '.join(MODES)})")
        if self.mode.startswith("adapter") and not self.adapters:
            raise RequestError(f"mode {self.mode!r} needs at least one adapter")
        paths = [str(path) for path, _ in self.adapters]
        if len(set(paths)) != len(paths):
            raise RequestError("an adapter may appear only once in a blend (give it one combined weight)")
        for path, weight in self.adapters:
            if not isinstance(weight, int | float) or weight != weight or abs(weight) > 4:
                raise RequestError(f"adapter weight for {path} must be a number in [-4, 4], got {weight!r}")

    @property
    def uses_adapters(self) -> bool:
        return uses_adapters(self.mode)

    @property
    def uses_retrieval(self) -> bool:
        return uses_retrieval(self.mode)

    def adapter_key(self) -> tuple[tuple[str, int, float], ...]:
        """Identity of the adapter set: file path, its modification time (a retrained file is new) and weight."""
        if not self.uses_adapters:
            return ()
        key = []
        paths = [str(path) for path, _ in self.adapters]
        if len(set(paths)) != len(paths):
            raise RequestError("an adapter may appear only once in a blend (give it one combined weight)")
        for path, weight in self.adapters:
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                mtime = -1
            key.append((str(path), mtime, float(weight)))
        return tuple(key)


@dataclass(frozen=True)
class Habits:
    """A member's surface habits: how often a message starts lowercase, ends with a full stop, names with a colon."""

    lower_start: float
    period_end: float
    address_colon: float


@dataclass(frozen=True)
class GenParams:
    """Sampling parameters for one reply; temperature 0 is greedy (deterministic)."""

    max_tokens: int = 96
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    # At most this many lines (0: any): fitted to how the member writes (inference/shape.py).
    max_lines: int = 0
    # How the member writes a message's first letter and its end (inference/shape.py); None: as the model writes.
    habits: Habits | None = None

    def validate(self) -> None:
        """Raise RequestError for parameters outside sane bounds."""
        if not 1 <= self.max_tokens <= 4096:
            raise RequestError(f"max_tokens must be between 1 and 4096, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise RequestError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
