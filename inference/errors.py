"""Errors of the inference package."""

from __future__ import annotations

from core.errors import DoppelError, UserFacingError


class InferenceError(DoppelError):
    """Something went wrong inside the engine (not the caller's fault)."""


class BusyError(UserFacingError):
    """The request queue is full: try again in a moment."""


class EngineClosedError(UserFacingError):
    """The engine is not running (not started yet, or shutting down)."""


class AdapterError(UserFacingError):
    """An adapter file cannot be used with the loaded base model."""


class RequestError(UserFacingError):
    """A reply request is malformed (unknown mode, missing adapter, bad parameters)."""


class RetrievalError(UserFacingError):
    """The retrieval persona cannot be built (no embedding model, no stored messages)."""


class ServerError(UserFacingError):
    """The persona server is down, too slow, lacks an adapter or refused a request ([inference] backend = server)."""


class ServerUnreachableError(ServerError):
    """The persona server did not accept the connection (down, or restarting with a new adapter list)."""

    def __init__(self, message: str, *, loading: bool = False) -> None:
        super().__init__(message)
        self.loading = loading  # it answered 503: up, still loading its model


class ChatNotAllowedError(UserFacingError):
    """The member has not given `chat` consent: nobody may talk to their persona."""
