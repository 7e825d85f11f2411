"""Errors the trainer child raises on purpose (the parent's are `jobs.errors`); those a person reads are user-facing."""

from __future__ import annotations

from core.errors import DoppelError, UserFacingError


class TrainerError(DoppelError):
    """Base of the trainer's own errors."""


class EvaluationError(UserFacingError):
    """A fidelity metric could not be computed from the given inputs."""


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
