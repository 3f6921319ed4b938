#!/usr/bin/env bash
# The device check, on a machine with an NVIDIA GPU and PyTorch + transformers; no Rust there:
# build `cargo build --release` elsewhere and bring the tree with `target/release/kiln`.
#   1. Kiln's CUDA kernels, compiled by the machine's NVRTC for its GPU, against the CPU path.
#   2. `kiln plan`'s prediction for GPT-2 124M (seq 1024, batch 8, bf16) on this GPU.
#   3. The same run in transformers (SDPA), eager and under torch.compile: tokens/s, model
#      TFLOP/s, peak memory. (Kiln training on the GPU is not built yet: see the CUDA issue.)
# Exits non-zero when a step fails. About 3-5 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}
status=0

# NVRTC where the loader does not find it on its own: the toolkit's, else the one PyTorch
# installed (nvidia-cuda-nvrtc). `kiln gpu-check` refuses one newer than the driver.
torch_nvrtc=$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $torch_nvrtc; do
  if ls "$dir"/libnvrtc.so* >/dev/null 2>&1; then
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    break
  fi
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

echo "== Kiln's kernels against the CPU path"
timeout 180 "$KILN" gpu-check || status=1

echo "== kiln plan: GPT-2 124M, seq 1024, batch 8, bf16, on $node"
"$KILN" plan bench/gpt2_124m_gpu.kiln --cluster "$node * 1" \
  | grep -E "^(strategy|step time|throughput)|^  (weights|compute)" || status=1

echo "== transformers GPT2LMHeadModel (SDPA), the same run"
for mode in eager compile; do
  timeout 240 python3 bench/transformers_lm.py --device cuda --size gpt2-124m --precision bf16 \
    --mode "$mode" --batch 8 --seq 1024 --steps 20 --warmup 5 || status=1
done
exit $status
