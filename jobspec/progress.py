"""Renderer-independent training progress: state built from job events, a text bar, and an edit throttle."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Enough points for a readable loss curve without letting a long job's progress_json grow without bound.
MAX_LOSS_POINTS = 200


@dataclass
class ProgressState:
    """What a person watching a job needs: step, total, loss, tokens/s, ETA, status."""

    status: str = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    phase: str = ""
    resumed_from: int = 0
    threads: int = 0
    tokens_seen: int = 0  # trained tokens so far (a window's throughput is the difference of two readings)
    paused_s: float = 0.0  # time the trainer stepped aside for persona replies
    priority: str = ""
    # What publishing prepared for serving (the retrieval index), and what it cost.
    serving: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Completed share of the steps, 0..1."""
        if self.total <= 0:
            return 1.0 if self.status == "succeeded" else 0.0
        return max(0.0, min(1.0, self.step / self.total))

    def apply(self, event: dict[str, Any], now: float | None = None) -> bool:
        """Fold one trainer event into the state; True when something a person would see changed."""
        kind = event.get("event")
        now = time.time() if now is None else now
        before = (self.status, self.step, self.total, self.phase)
        if kind == "started":
            self.status = "running"
            self.total = int(event.get("total") or event.get("max_steps") or self.total or 0)
            self.resumed_from = int(event.get("resumed_from_step") or 0)
            self.step = int(event.get("step") or self.resumed_from or 0)
        elif kind == "progress":
            self.status = "running"
            self.step = int(event.get("step", self.step))
            self.total = int(event.get("total") or self.total)
            self.loss = _number(event.get("loss"), self.loss)
            self.tokens_per_s = _number(event.get("tokens_per_s"), self.tokens_per_s)
            self.eta_s = _number(event.get("eta_s"), self.eta_s)
            self.threads = int(event.get("threads") or self.threads)
            self.tokens_seen = int(event.get("tokens_seen") or self.tokens_seen)
            self.paused_s = _number(event.get("paused_s"), self.paused_s) or 0.0
            if self.loss is not None and (not self.losses or self.losses[-1][0] != self.step):
                self.losses.append((self.step, self.loss))
                if len(self.losses) > MAX_LOSS_POINTS:
                    # Halve the resolution of the older half: the curve's shape survives, the size stays bounded.
                    self.losses = (
                        self.losses[: MAX_LOSS_POINTS // 2 : 2] + self.losses[MAX_LOSS_POINTS // 2 :]
                    )
        elif kind in ("phase", "export", "evaluating"):
            self.phase = str(event.get("phase") or event.get("name") or kind)
            self.priority = str(event.get("priority") or self.priority)
        elif kind == "finished":
            self.status = str(event.get("status") or "failed")
            if self.status == "succeeded":
                self.step = max(self.step, self.total)
                self.eta_s = 0.0
        else:
            return False
        self.updated_at = now
        return before != (self.status, self.step, self.total, self.phase) or kind == "progress"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form stored in the jobs table's progress_json."""
        data = asdict(self)
        data["losses"] = [list(p) for p in self.losses]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ProgressState:
        """Inverse of `to_dict`; tolerates missing or unknown keys."""
        data = dict(data or {})
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["losses"] = [(int(s), float(v)) for s, v in known.get("losses") or []]
        return cls(**known)


def format_duration(seconds: float | None) -> str:
    """`1:02:03`, `4:05` or `?` for an unknown duration."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_bar(state: ProgressState, width: int = 24, fill: str = "█", empty: str = "░") -> str:
    """One line: bar, percent, step/total, loss, tokens/s, ETA; works for a terminal and a Discord embed."""
    done = int(round(state.fraction * width))
    parts = [f"{fill * done}{empty * (width - done)} {state.fraction * 100:3.0f}%"]
    if state.total:
        parts.append(f"step {state.step}/{state.total}")
    if state.loss is not None:
        parts.append(f"loss {state.loss:.3f}")
    if state.tokens_per_s:
        parts.append(f"{state.tokens_per_s:.0f} tok/s")
    if state.status == "running":
        parts.append(f"ETA {format_duration(state.eta_s)}")
    elif state.status not in ("queued",):
        parts.append(state.status)
    else:
        parts.append("queued")
    if state.phase and state.status == "running" and state.fraction >= 1.0:
        parts.append(state.phase)
    return " · ".join(parts)


class Throttle:
    """Decides when a progress display may be redrawn: at most once per interval, always on status changes,
    and never to show the same text again (a log or a Discord message gains nothing from an identical line)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last_at: float | None = None
        self._last_status: str | None = None
        self._last_text: str | None = None

    def ready(self, state: ProgressState, now: float | None = None, text: str | None = None) -> bool:
        """True when the caller should redraw now (and records that it did); `text` is what it would show."""
        now = time.monotonic() if now is None else now
        changed = state.status != self._last_status
        if text is not None and text == self._last_text and not changed:
            return False
        if changed or self._last_at is None or now - self._last_at >= self.interval_s:
            self._last_at = now
            self._last_status = state.status
            self._last_text = text
            return True
        return False


def _number(value: Any, default: float | None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default
