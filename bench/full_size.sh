#!/usr/bin/env bash
# One architecture at full size with random weights: build it, export it with a preset (wall time and peak RSS from
# /usr/bin/time -v), then time `generate` on the bundle. Figures for the README's "Supported models" table.
#
#   bench/full_size.sh ARCH PRESET WORK [STEPS] [MEMORY]
#   bench/full_size.sh sdxl cpu /big/work 2 stream        # SDXL base at 1024², streamed (it does not fit resident)
#   bench/full_size.sh sd21 cpu-lowmem /big/work 2
#
# WORK needs room for the model and the bundle (SDXL: 14 GB + 13 GB). Run one at a time: the figures are peaks.
set -euo pipefail
arch=$1 preset=$2 work=$3 steps=${4:-2} memory=${5:-}
py=${PYTHON:-.venv/bin/python}
model="$work/$arch" bundle="$work/$arch-$preset"
mkdir -p "$work"
[ -f "$model/model_index.json" ] || "$py" -m pocketsd random-model "$model" --arch "$arch"
rm -rf "$bundle"
/usr/bin/time -v "$py" -m pocketsd export --model "$model" --preset "$preset" --out "$bundle" --quiet 2>&1 \
    | grep -E "Elapsed|Maximum resident|error" || true
du -sh "$bundle"
"$py" -m pocketsd.bench.generate_speed "$bundle" --steps "$steps" ${memory:+--memory "$memory"} \
    --json "$work/$arch-$preset-generate.json"
