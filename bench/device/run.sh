#!/usr/bin/env bash
# On the GPU machine, which has no network, in the repo root of the copy sent there:
#     bash bench/device/run.sh "$OUT"
# installs the carried wheels (.whl/, from bench/device/wheels.sh) into a temporary folder put on
# PYTHONPATH, checks the versions and the GPU (bench/device/check.py, nvidia-smi), then runs
# bench/gpu.py into OUT: gpu.json and gpu.md after every section, and versions.txt,
# nvidia-smi.txt and gpu.log. Ends within about 8.5 minutes: BUDGET_S (300) is gpu.py's --budget,
# TRAIN_S (60) its --train-seconds, LIMIT_S (480) stops it whatever it is doing.
# `--device cpu OUT` runs the same steps on the CPU: `make test-device-env` rehearses with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
device=cuda
if [[ ${1:-} == --device ]]; then
    device=$2
    shift 2
fi
out=${1:-${OUT:-}}
if [[ -z $out ]]; then
    echo "usage: bench/device/run.sh [--device cpu|cuda] OUT" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
if ! compgen -G '.whl/*.whl' >/dev/null; then
    echo "bench/device/run.sh: no wheels in .whl/: run bench/device/wheels.sh here and carry .whl" >&2
    exit 1
fi
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT

# Nothing but the wheels that travelled: no index, and no pip configuration to name another.
PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip install -q --isolated --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" .whl/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

"$PYTHON" bench/device/check.py --device "$device" | tee "$out/versions.txt"
args=(--device "$device" --out "$out" --budget "${BUDGET_S:-300}")
if [[ $device == cuda ]]; then
    nvidia-smi | tee "$out/nvidia-smi.txt"
    args+=(--train-seconds "${TRAIN_S:-60}")
fi
timeout -k 15 "${LIMIT_S:-480}" "$PYTHON" bench/gpu.py "${args[@]}" 2>&1 | tee "$out/gpu.log"
