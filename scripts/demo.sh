#!/usr/bin/env bash
# Sets up the environment, then runs the whole product loop offline on the bundled data and model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/doppel demo "$@"
