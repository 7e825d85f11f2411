#!/usr/bin/env bash
# Sets up the environment, then runs lint, type check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy core doppel data consent trainer jobs inference models bot jobspec
.venv/bin/python -m pytest "$@"
