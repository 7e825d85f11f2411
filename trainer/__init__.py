"""The trainer child process (`python -m trainer run JOB_DIR`: recipes, evaluation, export; torch). It reads the job
contract (`jobspec`) and imports nothing else of the project but the core; nothing outside it imports it."""

from __future__ import annotations
