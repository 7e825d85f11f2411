#!/usr/bin/env bash
# Serve Doppel personas from vLLM on a GPU machine: the base model once, each persona's LoRA adapter loaded at run
# time by the bot ([inference] backend = "server", server_flavour = "vllm"; see docs/scaling.md).
#
# UNTESTED: no GPU machine was available when this was written; the llama.cpp server flavour is the tested one.
#
# Usage: scripts/serve-vllm.sh HF_BASE_FOLDER [PORT]
#   HF_BASE_FOLDER  the transformers weights the personas were trained on (the GGUF is llama.cpp's, not vLLM's)
#   PORT            default 8000
# The adapter folders (DOPPEL_HOME/adapters/<member>/<version>/, with adapter_config.json and
# adapter_model.safetensors) must be readable on this machine at the same path as on the bot's host (a shared
# mount): the bot names each one by member, version and content hash and posts that path to /v1/load_lora_adapter.
# Listens on 127.0.0.1 unless HOST says otherwise; any other address needs DOPPEL_SERVER_API_KEY, which vLLM then
# requires of every request (runtime adapter loading included) and the bot sends.
# Environment: VLLM_VERSION (default 0.33.0), MAX_LORAS (adapters in one batch, default 8), MAX_CPU_LORAS (kept in
# host memory, default 64), MAX_LORA_RANK (default 64), SERVED_NAME (default doppel-base; set it as
# [inference] server_model).
set -euo pipefail

MODEL="${1:?usage: scripts/serve-vllm.sh HF_BASE_FOLDER [PORT]}"
PORT="${2:-8000}"
VENV="${VLLM_VENV:-.venv-vllm}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "serve-vllm: no NVIDIA GPU here (nvidia-smi not found); vLLM needs one" >&2
  exit 1
fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "serve-vllm: $MODEL is not a transformers model folder (no config.json)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/vllm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "vllm==${VLLM_VERSION:-0.33.0}"
fi
HOST="${HOST:-127.0.0.1}"
case "$HOST" in
  127.*|localhost|::1) ;;
  *) [ -n "${DOPPEL_SERVER_API_KEY:-}" ] || { echo "serve-vllm: refusing to serve on $HOST without DOPPEL_SERVER_API_KEY" >&2; exit 1; } ;;
esac
# vLLM reads VLLM_API_KEY from its environment: the key stays off the command line (ps).
[ -n "${DOPPEL_SERVER_API_KEY:-}" ] && export VLLM_API_KEY="$DOPPEL_SERVER_API_KEY"
# Adapters are loaded and unloaded while the server runs (erasure unloads a forgotten member's adapter).
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
exec "$VENV/bin/vllm" serve "$MODEL" \
  --host "$HOST" --port "$PORT" \
  --served-model-name "${SERVED_NAME:-doppel-base}" \
  --enable-lora \
  --max-loras "${MAX_LORAS:-8}" \
  --max-cpu-loras "${MAX_CPU_LORAS:-64}" \
  --max-lora-rank "${MAX_LORA_RANK:-64}"
