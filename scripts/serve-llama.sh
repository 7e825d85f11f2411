#!/usr/bin/env bash
# Serve Doppel personas from llama.cpp's llama-server ([inference] backend = "server", server_flavour =
# "llama.cpp"; see docs/scaling.md): builds the server once for this CPU (about 8 minutes on 2 cores, cached under
# ~/.cache/doppel/llama-server/), then starts it on BASE with every active persona of base NAME given as --lora.
# llama-server takes adapters only at its start: run this again after a persona is published or erased.
#
# Usage: scripts/serve-llama.sh BASE_NAME BASE.gguf [PORT]   (run from the repository, after scripts/setup.sh)
# Environment: DOPPEL_HOME as for the bot; SLOTS (parallel replies, default 2), N_CTX (default 2048), THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="${1:?usage: scripts/serve-llama.sh BASE_NAME BASE.gguf [PORT]}"
BASE="${2:?usage: scripts/serve-llama.sh BASE_NAME BASE.gguf [PORT]}"
PORT="${3:-8080}"
[ -f "$BASE" ] || { echo "serve-llama: $BASE is not a file" >&2; exit 1; }
SERVER="$(.venv/bin/python doppel/llamaserver.py)"
mapfile -t LORAS < <(.venv/bin/doppel --json personas --limit 10000 | .venv/bin/python -c '
import json, pathlib, sys
rows = json.loads(sys.stdin.read().strip().splitlines()[-1])["adapters"]
for r in rows:
    gguf = pathlib.Path(r["path"]) / "adapter.gguf"
    if r["status"] == "active" and r["base_model"] == sys.argv[1] and gguf.is_file():
        print(gguf)
' "$NAME")
ARGS=()
for lora in "${LORAS[@]}"; do ARGS+=(--lora "$lora"); done
echo "serve-llama: $BASE with ${#LORAS[@]} persona adapter(s) on port $PORT" >&2
# --lora-init-without-apply: no adapter applies until a request asks (each request lists every id);
# --cache-ram 0: the RAM prompt cache could restore KV computed under another adapter (llama.cpp #26207).
exec "$SERVER" -m "$BASE" --host 0.0.0.0 --port "$PORT" -c "${N_CTX:-2048}" -np "${SLOTS:-2}" \
  ${THREADS:+-t "$THREADS"} -fa off --cache-ram 0 --lora-init-without-apply "${ARGS[@]}"
