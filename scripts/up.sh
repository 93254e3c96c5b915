#!/usr/bin/env bash
# One command from a fresh clone to a running local cluster on http://127.0.0.1:8000 (demo model, embedded Redis).
# Extra arguments go to `tributary up` (e.g. --demo-size tiny, --port 8001, --model DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
exec .venv/bin/tributary up "$@"
