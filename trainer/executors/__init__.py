"""Executors: where the trainer child runs (a local subprocess or a Ray cluster)."""

from __future__ import annotations

from trainer.executors.base import Executor, Outcome, Run, parse_event

__all__ = ["Executor", "Outcome", "Run", "parse_event", "make_executor"]


def make_executor(kind: str, settings: object) -> Executor:
    """The executor named by `settings.training.executor` (`local` or `ray`)."""
    from trainer.errors import SupervisorError

    if kind == "local":
        from trainer.executors.local import LocalExecutor

        return LocalExecutor(settings)  # type: ignore[arg-type]
    if kind == "ray":
        from trainer.executors.ray import RayExecutor

        return RayExecutor(settings)  # type: ignore[arg-type]
    raise SupervisorError(f"unknown executor {kind!r}: use `local` or `ray` in [training] executor")
