#!/usr/bin/env bash
# Reproduces benchmarks/RESULTS.md on this machine: full-size RANDOM checkpoints (real shapes, random
# values) → fp32 export (verified) → int8 / int4 → bench against transformers on the same weights.
# Each step's peak RSS comes from /usr/bin/time -v. Needs ~45 GB of disk per preset; long steps show progress.
# Usage: benchmarks/run_published.sh [PRESET ...]   (default: paligemma-3b-224)
set -euo pipefail
cd "$(dirname "$0")/.."
PE=.venv/bin/paligemma-edge
DATA=${DATA:-../bench_data}
OUT=benchmarks/results
mkdir -p "$DATA" "$OUT"
peak() { grep -E "Maximum resident|Elapsed" "$1" | sed 's/^\s*//'; }
for preset in "${@:-paligemma-3b-224}"; do
  hf="$DATA/$preset-hf"
  [ -d "$hf" ] || /usr/bin/time -v -o "$OUT/$preset-random.time" $PE random-checkpoint --preset "$preset" "$hf"
  /usr/bin/time -v -o "$OUT/$preset-export.time" $PE export "$hf" "$DATA/$preset-fp32"
  for recipe in int8 int4; do
    /usr/bin/time -v -o "$OUT/$preset-quantize-$recipe.time" \
      $PE quantize "$DATA/$preset-fp32" "$DATA/$preset-$recipe" --recipe "$recipe"
  done
  for step in random export quantize-int8 quantize-int4; do
    [ -f "$OUT/$preset-$step.time" ] && { echo "$preset $step:"; peak "$OUT/$preset-$step.time"; }
  done
  $PE bench "$DATA/$preset-fp32" "$DATA/$preset-int8" "$DATA/$preset-int4" --new-tokens 32 --repeat 3 \
    --baseline-hf "$hf" --hf-dtypes fp32,bf16 --json "$OUT/$preset.json" --plot "$OUT/$preset.png"
done
