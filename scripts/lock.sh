#!/usr/bin/env bash
# Regenerates the hashed lock files that scripts/setup.sh installs from: one per extra (cpu, gpu, dev) and one for
# the audit tool. Run it after changing a dependency in pyproject.toml, then run the tests and commit the locks.
# The locks are universal (every platform and Python >= 3.11, with markers); versions already in a lock are kept
# unless pyproject.toml no longer admits them (pass --upgrade to take the newest releases).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${TMPDIR:-/tmp}/tributary-lock-tools"
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/python" -m pip install --quiet 'uv==0.13.*'; }
uv=("$tools/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-header "$@")
for extra in cpu gpu dev; do
    "${uv[@]}" pyproject.toml --extra "$extra" -o "requirements/$extra.lock"
done
"${uv[@]}" requirements/audit.in -o requirements/audit.lock
echo "locks written: requirements/{cpu,gpu,dev,audit}.lock"
