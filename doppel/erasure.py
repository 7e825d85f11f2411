"""The composition root of the erasure cascade: the modules whose parts `forget` runs and the export holds."""

from __future__ import annotations

from consent import parts as consent_parts
from consent.erasure import ErasureParts
from inference import erasure as inference_erasure
from jobs import erasure as jobs_erasure
from models import erasure as models_erasure


def erasure_parts() -> ErasureParts:
    """Every erasure part and export section of the application; a component that stores member data adds its module here."""
    return ErasureParts.of(consent_parts, jobs_erasure, models_erasure, inference_erasure)
