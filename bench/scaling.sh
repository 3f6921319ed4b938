#!/usr/bin/env bash
# Tokens/s of one GPT-2-style training step on cpu(1) and on cpu(2) with each kind of
# parallelism, measured in one run (release build): `bench/scaling.sh [steps]`.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-3}"
cargo build --release --quiet
for e in one data2 tensor2 tensor2_sp pipeline2; do
  ./target/release/kiln bench bench/gpt2_6l_384_scaling.kiln --experiment "$e" --steps "$steps" --warmup 1
done
