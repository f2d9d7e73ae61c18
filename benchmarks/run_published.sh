#!/usr/bin/env bash
# Reproduces docs/performance.md's tables on this machine: full-size RANDOM checkpoints (real shapes, random
# values) → fp32 export (verified) → int8 / int4 → bench against transformers on the same weights.
# Each step's wall time and peak RSS come from /usr/bin/time -v (benchmarks/results/export-memory-PRESET-STEP.time).
# Needs ~30 GB of disk per preset; long steps show progress.
# Usage: benchmarks/run_published.sh [PRESET ...]   (default: paligemma-3b-224)
# Environment: RECIPES (default "int8 int4"), BENCH (exports to bench, default "fp32 int8 int4"),
#   HF (transformers baselines, default "fp32,bf16"; empty: none), REPEAT (runs per process, default 3),
#   ROUNDS (round-robin passes over all targets, default 1; the published 224 px tables use 3),
#   DATA (default ../bench_data), CLEAN=1 deletes the checkpoint and fp32 export once benchmarked.
set -euo pipefail
cd "$(dirname "$0")/.."
PE=.venv/bin/paligemma-edge
DATA=${DATA:-../bench_data}
OUT=benchmarks/results
RECIPES=${RECIPES-int8 int4}
BENCH=${BENCH-fp32 int8 int4}
HF=${HF-fp32,bf16}
mkdir -p "$DATA" "$OUT"
timed() { local name=$1; shift; /usr/bin/time -v -o "$OUT/export-memory-$name.time" "$@"; }
peak() { grep -E "Maximum resident|Elapsed" "$1" | sed 's/^\s*//'; }
for preset in "${@:-paligemma-3b-224}"; do
  hf="$DATA/$preset-hf"
  [ -d "$hf" ] || timed "$preset-random" $PE random-checkpoint --preset "$preset" "$hf"
  [ -d "$DATA/$preset-fp32" ] || timed "$preset-export" $PE export "$hf" "$DATA/$preset-fp32"
  for recipe in $RECIPES; do
    timed "$preset-quantize-$recipe" $PE quantize "$DATA/$preset-fp32" "$DATA/$preset-$recipe" --recipe "$recipe"
  done
  for step in random export $(printf "quantize-%s " $RECIPES); do
    [ -f "$OUT/export-memory-$preset-$step.time" ] && { echo "$preset $step:"; peak "$OUT/export-memory-$preset-$step.time"; }
  done
  dirs=(); for precision in $BENCH; do dirs+=("$DATA/$preset-$precision"); done
  baseline=(); [ -n "$HF" ] && baseline=(--baseline-hf "$hf" --hf-dtypes "$HF")
  $PE bench "${dirs[@]}" --new-tokens 32 --repeat "${REPEAT:-3}" --rounds "${ROUNDS:-1}" "${baseline[@]}" \
    --json "$OUT/latency-$preset.json" --plot "$OUT/latency-$preset.png"
  if [ "${CLEAN:-0}" = 1 ]; then rm -rf "$hf" "$DATA/$preset-fp32"; fi
done
