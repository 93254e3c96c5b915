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
# The playground's browser test drives a Chromium (tests/e2e/test_playground.py): Debian's, installed here when we
# may (root with apt); elsewhere install one yourself (or set TRIBUTARY_CHROMIUM), or those tests skip.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${TRIBUTARY_CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing Debian's chromium for the playground's browser test" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null; } || echo "test: chromium could not be installed" >&2
fi
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
