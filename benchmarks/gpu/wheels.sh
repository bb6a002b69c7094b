#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that benchmarks/gpu/run.sh
# installs on the lent GPU machine (no network there).  That machine has
# Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, accelerate, numba,
# safetensors, tokenizers, peft, pyyaml, numpy, pytest; it lacks mergekit,
# pydantic and immutables.  What mergekit 0.1.5 imports on the paths run.sh
# takes (mergekit-yaml / run_merge, mergekit-cabs tune, the benchmarks) is
# carried, with --no-deps: mergekit's declared `datasets`, `scipy`,
# `sentencepiece`, `protobuf` are never imported there and stay behind.
#
#   bash benchmarks/gpu/wheels.sh                 # -> benchmarks/gpu/wheels/ (ignored by git)
#   bash benchmarks/gpu/wheels.sh DIR             # elsewhere
#   WHEELS_PYTHON=3.11 bash benchmarks/gpu/wheels.sh DIR   # for another CPython (the CPU proof)
#
# The pins are the versions /work/venv's full test suite runs with mergekit
# 0.1.5, inside mergekit 0.1.5's own ranges (pydantic<3,>=2.10.6,
# immutables<1,>=0.21, click<9,>=8.2.1, tqdm<5,>=4.67.1).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-$here/wheels}
py=${WHEELS_PYTHON:-3.12}
pip=${PIP:-python3 -m pip}

# Missing on the lent machine: mergekit and what it imports that is not there.
CORE=(
    mergekit==0.1.5
    pydantic==2.14.4
    pydantic-core==2.50.5       # pydantic 2.14.4 pins it exactly
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0   # pydantic 2.14.4 needs >= 4.16.0; the machine's version is not known
    immutables==0.21
    click==8.5.1                # mergekit needs >= 8.2.1; the machine's version is not known
    tqdm==4.70.1                # mergekit needs >= 4.67.1; likewise
)
# Installed by run.sh only where `import pytest` fails there (the machine's
# package list names pytest; its plugins then stay its own).
FALLBACK=(
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    pygments==2.21.0
    packaging==26.4
)

fetch() {  # fetch DIR SPEC...
    local into=$1
    shift
    # shellcheck disable=SC2086
    $pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$into" "$@"
}

rm -rf "$dest"
mkdir -p "$dest/fallback"
fetch "$dest" "${CORE[@]}"
fetch "$dest/fallback" "${FALLBACK[@]}"

# One wheel per name, every name present: two versions of one stop the install there.
for spec in "${CORE[@]}" "${FALLBACK[@]}"; do
    name=${spec%%==*}
    stem=$(echo "$name" | tr '-' '_')
    found=$(find "$dest" -name "${stem}-*.whl" -o -name "${name}-*.whl" | sort -u | wc -l)
    if [ "$found" != 1 ]; then
        echo "wheels.sh: expected one wheel of $name in $dest, found $found" >&2
        exit 1
    fi
done

bytes=$(find "$dest" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
limit=$((64 * 1024 * 1024))
find "$dest" -name '*.whl' -printf '%s\t%P\n' | sort -k2
echo "total: $bytes bytes ($(awk -v b="$bytes" 'BEGIN {printf "%.2f", b / 1048576}') MiB) for CPython $py in $dest"
if [ "$bytes" -ge "$limit" ]; then
    echo "wheels.sh: the wheels are over the 64 MiB a device call carries" >&2
    exit 1
fi
