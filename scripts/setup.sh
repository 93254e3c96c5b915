#!/usr/bin/env bash
# Creates .venv (if missing) and installs Tributary into it with the given extra (cpu | gpu | dev), every dependency
# at the version and hash that requirements/<extra>.lock records (scripts/lock.sh regenerates the locks).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-cpu}"
lock="requirements/${extra}.lock"
[ -f "$lock" ] || { echo "no lock file for extra '${extra}' (cpu | gpu | dev)" >&2; exit 2; }
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
# onnxruntime and onnxruntime-gpu install the same module: switching extras must not leave the other one behind.
other=$([ "$extra" = gpu ] && echo onnxruntime || echo onnxruntime-gpu)
if .venv/bin/python -m pip show --quiet "$other" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet --yes "$other"
fi
# Every package, its dependencies included, must match a hash in the lock; nothing unpinned is resolved.
# Progress: pip's download bars on a terminal, one line per package otherwise (CI logs); nothing when all is there.
count=$(grep -c '^[A-Za-z0-9]' "$lock")
start=$(date +%s)
if .venv/bin/python -m pip install --quiet --require-hashes --no-deps --no-index --find-links /nonexistent \
        -r "$lock" >/dev/null 2>&1; then
    echo "setup: the ${count} packages of ${lock} are installed" >&2
else
    echo "setup: installing ${count} packages from ${lock} into .venv (first run: about 5 GB, PyTorch is a CUDA" \
         "build; 2-5 minutes on a fast link)" >&2
    if [ -t 1 ]; then  # download bars
        .venv/bin/python -m pip install --require-hashes --no-deps -r "$lock" || true
    else  # a line per package
        .venv/bin/python -m pip install --require-hashes --no-deps --progress-bar off -r "$lock" \
            | grep -E --line-buffered '^(Collecting|Installing|Successfully)' || true
    fi
    .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r "$lock"  # fails loudly if anything is off
    echo "setup: packages installed in $(( $(date +%s) - start )) s" >&2
fi
# The project itself, built with the setuptools the lock installed (no isolated build fetching an unpinned one).
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
