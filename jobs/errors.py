"""Errors of the training control plane (supervisor, executors, pre-flight, datasets), raised in the parent process."""

from __future__ import annotations

from core.errors import UserFacingError


class SupervisorError(UserFacingError):
    """A training job could not be submitted, run, cancelled or resumed."""


class JobConflictError(SupervisorError):
    """The member already has an active (queued, running or interrupted) job."""


class JobNotFoundError(SupervisorError):
    """No job with that id (or none for that member)."""


class PreflightError(SupervisorError):
    """The host cannot run the job as configured; the message says why and what to change."""


class ExecutorError(SupervisorError):
    """The executor (local subprocess or Ray cluster) could not start or follow the trainer."""


class DatasetError(UserFacingError):
    """A training dataset could not be built from the stored messages."""


class NotEnoughExamplesError(DatasetError):
    """The member has too few usable replies to train a persona."""
