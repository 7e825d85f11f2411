#!/usr/bin/env bash
# Serve Doppel personas from llama.cpp's llama-server ([inference] backend = "server", server_flavour =
# "llama.cpp"; see docs/scaling.md) through `doppel serve`: it builds the server once for this CPU (about 8 minutes
# on 2 cores), starts it with the base's active personas and restarts it by itself when one is published or erased.
#
# Usage: scripts/serve-llama.sh [BASE_NAME] [PORT]   (run from the repository, after scripts/setup.sh)
# Environment: DOPPEL_HOME as for the bot; HOST (default 127.0.0.1; any other address needs DOPPEL_SERVER_API_KEY,
# which the bot then sends); SLOTS (parallel replies, default 2); THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=(serve --host "${HOST:-127.0.0.1}" --port "${2:-8080}" --slots "${SLOTS:-2}")
[ -n "${1:-}" ] && ARGS+=(--base "$1")
[ -n "${THREADS:-}" ] && ARGS+=(--threads "$THREADS")
exec .venv/bin/doppel "${ARGS[@]}"
