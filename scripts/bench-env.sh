#!/usr/bin/env bash
# The load generator's own environment for bench/serve.py: NVIDIA's aiperf (PyPI), apart from the product's .venv
# (aiperf brings pandas, dash, datasets, ... that the product must not carry). Idempotent; ~2 min the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
AIPERF_VERSION=0.13.0
if [ ! -x .venv-bench/bin/aiperf ] || ! .venv-bench/bin/python -c "import aiperf, sys; sys.exit(aiperf.__version__ != '$AIPERF_VERSION')" 2>/dev/null; then
    python3 -m venv .venv-bench
    .venv-bench/bin/python -m pip install --quiet "aiperf==$AIPERF_VERSION"
fi
.venv-bench/bin/aiperf --version 2>/dev/null || true
