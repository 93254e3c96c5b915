#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite: unit, integration (real Redis, real processes) and e2e
# (the official openai SDK against a real local cluster). Extra arguments go to pytest.
# --docker (first argument) also runs tests/deploy: it builds deploy/Dockerfile and brings up
# deploy/docker-compose.yml with a real Docker engine (tests/deploy/docker-env.sh provides one on Debian as root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--docker" ]; then
    shift
    export TRIBUTARY_DOCKER_TESTS=1
fi
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
