#!/usr/bin/env bash
# The device check, on a machine with an NVIDIA GPU and PyTorch + transformers; no Rust there:
# build `cargo build --release` elsewhere and bring the tree with `target/release/kiln`.
#   1. Kiln's CUDA kernels, compiled by the machine's NVRTC for its GPU, and its training step
#      (GPT-2 + LoRA, LLaMA in bf16, BERT), against the CPU path.
#   2. The quick-start trained on the GPU (`mesh = gpu(1)`) and on the CPU: both loss curves.
#   3. `kiln plan`'s prediction for GPT-2 124M (seq 1024, batch 8, bf16) on this GPU, and
#      `kiln bench` of it on the GPU.
#   4. The same run in transformers (SDPA), eager and under torch.compile: tokens/s, model
#      TFLOP/s, peak memory.
# Needs the driver, NVRTC and cuBLAS (the toolkit's, or PyTorch's nvidia-* wheels). Exits
# non-zero when a step fails. About 4-7 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}
status=0

# NVRTC and cuBLAS where the loader does not find them on its own: the toolkit's, else the
# ones PyTorch installed (nvidia-cuda-nvrtc, nvidia-cublas). `kiln gpu-check` refuses an NVRTC
# newer than the driver.
wheel_lib() {
  python3 -c "import nvidia.$1 as m, os; print(os.path.join(list(m.__path__)[0], 'lib'))" 2>/dev/null || true
}
for lib in nvrtc:cuda_nvrtc cublas:cublas; do
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(wheel_lib "${lib#*:}"); do
    if ls "$dir/lib${lib%%:*}.so"* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
done

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
case "$gpu" in
  *H200*) node=one_h200 ;;
  *H100*) node=one_h100 ;;
  *A100*) node=one_a100 ;;
  *)
    node=one_h100
    echo "warning: no profile for $gpu; the plan below is an H100's" >&2
    ;;
esac

echo "== Kiln's kernels and training step against the CPU path"
timeout 180 "$KILN" gpu-check || status=1

echo "== the quick-start on the GPU (mesh = gpu(1)), then on the CPU"
scratch=$(mktemp -d)
printf 'import "%s/examples/quickstart.kiln"\nexperiment quickstart_gpu = quickstart { parallel { mesh = gpu(1) } }\n' \
  "$PWD" > "$scratch/gpu.kiln"
for file in "$scratch/gpu.kiln" examples/quickstart.kiln; do
  timeout 150 "$KILN" run "$file" --runs "$scratch/runs" 2>&1 | tail -3 || status=1
done
for run in quickstart_gpu quickstart; do
  losses=$(grep -o '"eval_loss":[0-9.]*' "$scratch/runs/$run/metrics.jsonl" | cut -d: -f2 | tr '\n' ' ')
  echo "$run: evaluation loss every 100 steps: $losses"
done
rm -rf "$scratch"

echo "== kiln plan: GPT-2 124M, seq 1024, batch 8, bf16, on $node"
"$KILN" plan bench/gpt2_124m_gpu.kiln --cluster "$node * 1" \
  | grep -E "^(strategy|step time|throughput)|^  (weights|compute)" || status=1

echo "== kiln bench: GPT-2 124M on the GPU"
timeout 150 "$KILN" bench bench/gpt2_124m_gpu.kiln --steps 6 --warmup 2 || status=1

echo "== transformers GPT2LMHeadModel (SDPA), the same run"
for mode in eager compile; do
  timeout 240 python3 bench/transformers_lm.py --device cuda --size gpt2-124m --precision bf16 \
    --mode "$mode" --batch 8 --seq 1024 --steps 20 --warmup 5 || status=1
done
exit $status
