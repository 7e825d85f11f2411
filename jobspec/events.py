"""JSON-lines job events on stdout: one object a line, flushed per line, nothing else on that stream."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: a diverged loss must still produce a parseable line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Emitter:
    """Writes job events; also keeps them in memory so a recipe (or a test) can look back at what it reported."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Emit `{"event": event, "ts": now, **fields}` as one flushed line."""
        record = {"event": event, "ts": round(time.time(), 3), **_clean(fields)}
        self.events.append(record)
        if self.stream is not None:
            self.stream.write(json.dumps(record, default=str) + "\n")
            self.stream.flush()
        return record

    def of(self, event: str) -> list[dict[str, Any]]:
        """The events of one kind emitted so far."""
        return [e for e in self.events if e["event"] == event]


def stdout_emitter() -> Emitter:
    """The child's emitter: the real stdout, captured before anything redirects `sys.stdout` to stderr."""
    return Emitter(sys.__stdout__)
