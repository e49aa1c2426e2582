#!/usr/bin/env bash
# Here, before a call on the GPU machine: the wheels of bench/device/wheels.txt, built for its
# Python 3.12 on manylinux x86-64, into .whl/ (ignored; a device call carries it). Fails when
# they pass 60 MiB, or when they and the working tree pass the 64 MiB that travels.
#     bash bench/device/wheels.sh          # PYTHON=... picks the pip (default python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS_MIB=60
TRAVEL_MIB=64

rm -rf .whl
mkdir .whl
# pip matches each manylinux tag exactly: name every one a wheel here may carry.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -r bench/device/wheels.txt

wanted=$(grep -c '^[^#[:space:]]' bench/device/wheels.txt)
got=$(find .whl -type f -name '*.whl' | wc -l)
if (( got != wanted )); then
    echo "bench/device/wheels.sh: $got wheels in .whl for the $wanted lines of bench/device/wheels.txt" >&2
    exit 1
fi

mib() { awk '{ s += $1 } END { printf "%.1f", s / 1048576 }'; }
wheels=$(find .whl -type f -name '*.whl' -printf '%s\n' | mib)
# What a device call sends: tracked and untracked-not-ignored files (a deleted one has no size).
tree=$( { git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true; } | mib)
ls -l .whl
echo "wheels: $got files, $wheels MiB (limit $WHEELS_MIB); with the working tree ($tree MiB): \
$(awk "BEGIN { print $wheels + $tree }") MiB (limit $TRAVEL_MIB)"
awk "BEGIN { exit !($wheels <= $WHEELS_MIB && $wheels + $tree <= $TRAVEL_MIB) }" || {
    echo "bench/device/wheels.sh: over the limit" >&2
    exit 1
}
touch .whl/.complete
