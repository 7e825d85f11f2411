"""The trainer child process (`python -m trainer run JOB_DIR`: recipes, evaluation, export; torch) and the job
contract it reads (`config.TrainConfig`, `jobdata`, `example`, `events`, `progress`). Imports the core only."""

from __future__ import annotations
