#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite: unit, integration (real Redis, real processes) and e2e
# (the official openai SDK against a real local cluster). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
