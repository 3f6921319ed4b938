#!/usr/bin/env bash
# Kiln's CPU training speed beside what users run instead, measured alternately in one run:
# `kiln bench` of each experiment in bench/cpu_references.kiln, then transformers' model of the
# same shape eager and under torch.compile (bench/transformers_lm.py), round after round, all
# with as many threads as the machine has cores. Prints every measurement, then the range of
# seconds per step per configuration and tool.
#
#   bench/cpu_references.sh [rounds=3] [steps=5]     # PYTHON=... picks a python with torch
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
steps="${2:-5}"
python="${PYTHON:-python3}"
threads="$(nproc)"
cargo build --release --quiet
results="$(mktemp)"
errors="$(mktemp)"
trap 'rm -f "$results" "$errors"' EXIT

# experiment, transformers size, batch, seq
configs=(
  "gpt2_6l_384_v1024 gpt2-6l-384 8 256"
  "gpt2_6l_384_v8192 gpt2-6l-384-v8192 8 256"
  "gpt2_124m gpt2-124m 4 512"
  "llama_6l_384 llama-6l-384 8 256"
)
for config in "${configs[@]}"; do
  read -r experiment size batch seq <<<"$config"
  for round in $(seq "$rounds"); do
    kiln=$(RAYON_NUM_THREADS="$threads" ./target/release/kiln bench bench/cpu_references.kiln \
      --experiment "$experiment" --steps "$steps" --warmup 1 | sed -n 's/.* \([0-9.]*\) s\/step median.*/\1/p')
    if [ -z "$kiln" ]; then
      echo "kiln bench printed no step time for $experiment" >&2
      exit 1
    fi
    echo "$experiment round $round: kiln $kiln s/step"
    echo "$experiment kiln $kiln" >>"$results"
    for mode in eager compile; do
      # torch.compile compiles during its first steps: two of warm-up.
      if ! out=$("$python" bench/transformers_lm.py --device cpu --size "$size" --mode "$mode" \
        --batch "$batch" --seq "$seq" --steps "$steps" --warmup 2 --threads "$threads" 2>"$errors" | tail -1); then
        echo "transformers $mode on $size failed:" >&2
        cat "$errors" >&2
        exit 1
      fi
      seconds=$("$python" -c 'import json,sys; print(json.loads(sys.argv[1])["seconds_per_step"])' "$out")
      echo "$experiment round $round: transformers $mode $seconds s/step"
      echo "$experiment transformers_$mode $seconds" >>"$results"
    done
  done
done

echo
echo "s/step (min-max over $rounds rounds, median of $steps steps each), $threads threads, $(date -u +%F)"
awk '{ key = $1 " " $2; if (!(key in lo) || $3 < lo[key]) lo[key] = $3; if ($3 > hi[key]) hi[key] = $3;
       if (!(key in seen)) { seen[key] = 1; order[++n] = key } }
     END { for (i = 1; i <= n; i++) printf "%-40s %.2f-%.2f\n", order[i], lo[order[i]], hi[order[i]] }' "$results"
