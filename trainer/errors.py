"""Errors the trainer raises on purpose; the ones a person reads subclass `UserFacingError`."""

from __future__ import annotations

from core.errors import DoppelError, UserFacingError


class TrainerError(DoppelError):
    """Base of the trainer's own errors."""


class DatasetError(UserFacingError):
    """A training dataset could not be built from the stored messages."""


class NotEnoughExamplesError(DatasetError):
    """The member has too few usable replies to train a persona."""


class EvaluationError(UserFacingError):
    """A fidelity metric could not be computed from the given inputs."""


# -- training control plane (jobs, supervisor, executors, pre-flight) -------------------------------------------
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


class JobConfigError(UserFacingError):
    """A job folder's config.json or dataset cannot be used for training."""


class ExportError(UserFacingError):
    """A trained adapter could not be exported to the adapter folder or GGUF."""


class TrainingError(UserFacingError):
    """Training could not finish (e.g. out of memory even at micro-batch 1)."""


class JobCancelled(TrainerError):
    """The job was asked to stop (SIGTERM); a checkpoint was saved at the last step boundary."""


class StepAbandoned(TrainerError):
    """Raised between two transformer blocks of a cancelled job: the step is left unfinished, its weights untouched."""
