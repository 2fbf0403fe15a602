# Issue 17 on one GPU: W1 (512 requests, prompts 128-1024, 256 new tokens; Llama-3-8B shapes,
# dummy weights) with bf16 weights and with fp8 weights quantized at load, one process each,
# one after the other on the same machine, with --full-warmup as W1's earlier figures.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OFFLINE_ONLY=1
# shellcheck disable=SC1091
source loadtests/gpu_setup.sh
for quantization in none fp8; do
  flags=()
  [ "$quantization" = none ] || flags=(--quantization "$quantization")
  python3 loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
    --load-format dummy --dtype bfloat16 --device cuda --num-prompts 512 --min-len 128 \
    --max-len 1024 --new-tokens 256 --rounds 2 --no-hf --max-model-len 4096 --full-warmup \
    "${flags[@]}" --json "$OUT/w1-$quantization.json" 2>&1 | tee -a "$OUT/w1.log"
done
