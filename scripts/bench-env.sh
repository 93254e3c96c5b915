#!/usr/bin/env bash
# The load generator's own environment for bench/serve.py: NVIDIA's aiperf (PyPI), apart from the product's .venv
# (aiperf brings pandas, dash, datasets, ... that the product must not carry). Idempotent; ~2 min the first time.
# --ray: also .venv-ray, the Ray Serve baseline's (the product's cpu lock, then ray[serve] held to the lock's
# versions; ~3 min, 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
AIPERF_VERSION=0.13.0
if [ ! -x .venv-bench/bin/aiperf ] || ! .venv-bench/bin/python -c "import aiperf, sys; sys.exit(aiperf.__version__ != '$AIPERF_VERSION')" 2>/dev/null; then
    python3 -m venv .venv-bench
    .venv-bench/bin/python -m pip install --quiet "aiperf==$AIPERF_VERSION"
fi
if [ "${1:-}" = --ray ] && [ ! -x .venv-ray/bin/ray ]; then
    python3 -m venv .venv-ray
    .venv-ray/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements/cpu.lock
    .venv-ray/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
    constraints=$(mktemp)
    grep -v '^\s*--hash\|^\s*#' requirements/cpu.lock | sed 's/ \\$//' | grep -v '^$' > "$constraints"
    .venv-ray/bin/python -m pip install --quiet "ray[serve]==2.60.0" -c "$constraints"
    rm -f "$constraints"
fi
.venv-bench/bin/aiperf --version 2>/dev/null || true
