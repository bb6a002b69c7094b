#!/usr/bin/env bash
# Every CUDA path of mergekit-cabs, checked and timed in one go on a lent GPU
# (one H100 or H200, Python 3.12 with torch and transformers, no network):
#
#   bash benchmarks/gpu/wheels.sh             # here first: the missing packages as wheels
#   bash benchmarks/gpu/run.sh                # there, with benchmarks/gpu/wheels carried along
#   GPU_DRY_RUN=1 bash benchmarks/gpu/run.sh  # here: the same steps on the CPU, tiny shapes
#
# 1. Installs the wheels (benchmarks/gpu/wheels, or $GPU_WHEELS) with pip
#    --no-index --no-deps into a temporary target and puts it and this checkout
#    on PYTHONPATH (the package's .pth autoload does not run from there: every
#    step imports mergekit_cabs itself).  Without a wheels folder the step is
#    recorded as "skipped: no wheels folder ..." and the Python's own packages
#    are used.  pytest comes from wheels/fallback only where `import pytest` fails.
# 2. Runs benchmarks/gpu/steps.py: the steps, each timed and under a timeout,
#    none stopping the next; the JSON file with every figure, and the log, go
#    to $OUT (default benchmarks/gpu/out).
#
# Environment: PYTHON (default python3), OUT, GPU_WHEELS, GPU_DRY_RUN=1,
# GPU_BUDGET_S (seconds for all steps; default 480 on the GPU, 300 dry).
# Exit status 0 when every step passed, 1 otherwise.
set -u

repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-python3}
out=${OUT:-$repo/benchmarks/gpu/out}
wheels=${GPU_WHEELS:-$repo/benchmarks/gpu/wheels}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/cabs-gpu-XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$out"
log=$out/gpu-run.log
: >"$log"

started=$(date +%s.%N)
if compgen -G "$wheels/*.whl" >/dev/null; then
    echo "===== install_wheels: $py -m pip install --no-index --no-deps --target $scratch/site $wheels/*.whl" >>"$log"
    extra=()
    if ! "$py" -c "import pytest" 2>/dev/null; then
        extra=("$wheels"/fallback/*.whl)
    fi
    for w in "$wheels"/*.whl "${extra[@]}"; do echo "  ${w##*/}" >>"$log"; done
    if "$py" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$scratch/site" "$wheels"/*.whl "${extra[@]}" >>"$log" 2>&1; then
        install="passed"
    else
        install="failed: pip install (see $log)"
    fi
    export PYTHONPATH="$scratch/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
    install="skipped: no wheels folder ($wheels)"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
echo "install_wheels         $seconds s  $install"

export PYTHONUNBUFFERED=1 MERGEKIT_CABS_STRICT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
args=(--out "$out" --scratch "$scratch/work" --install "$install" --install-seconds "$seconds")
if [ "${GPU_DRY_RUN:-0}" = 1 ]; then
    args+=(--dry-run)
fi
if [ -n "${GPU_BUDGET_S:-}" ]; then
    args+=(--budget-s "$GPU_BUDGET_S")
fi
"$py" "$repo/benchmarks/gpu/steps.py" "${args[@]}"
