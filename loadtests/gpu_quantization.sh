# Issue 17 on one GPU, by steps (each fits one device call of at most 10 minutes):
#   kernels  gpu_weight_only.py: the W4A16 GEMM against bf16 per Llama-3-8B projection, decode
#            batches 1-16, checked and timed, with a sweep of launches;
#   decode   decode_latency.py: ms per decode step at batches 1, 4 and 16 on Llama-3-8B shapes
#            (dummy weights), bf16, fp8 (quantized at load) and W4A16 (compressed-tensors
#            config, loadtests/configs/llama3-8b-w4a16), one process each;
#   w1       W1 (512 requests, prompts 128-1024, 256 new tokens) with bf16 and fp8 weights, one
#            process each, one after the other, with --full-warmup as W1's earlier figures
#            (W1_METHODS picks them: "none fp8" by default; W1_KV=fp8: both with an fp8 KV cache).
#   breakdown gpu_time_breakdown.py: W1's GPU time by kernel group, per method (W1_METHODS).
#   fp8gemm  gpu_fp8_gemm.py: e4m3 GEMMs (row-wise and tensor-wise scales) against bf16 at W1's
#            decode and prefill token counts, with and without the activation quantization.
#   bash loadtests/gpu_quantization.sh kernels decode
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OFFLINE_ONLY=1
# shellcheck disable=SC1091
source loadtests/gpu_setup.sh
for step in "$@"; do
  case "$step" in
    kernels)
      python3 loadtests/gpu_weight_only.py 2>&1 | tee "$OUT/kernels.log" ;;
    decode)
      for variant in ${DECODE_VARIANTS:-bf16 fp8 w4a16}; do
        model=loadtests/configs/llama3-8b flags=()
        [ "$variant" = fp8 ] && flags=(--quantization fp8)
        [ "$variant" = w4a16 ] && model=loadtests/configs/llama3-8b-w4a16
        (cd loadtests && python3 decode_latency.py --model "../$model" --load-format dummy \
          --dtype bfloat16 --batches 1 4 16 --rounds 3 "${flags[@]}" \
          --json "$OUT/decode-$variant.json") 2>&1 | tee -a "$OUT/decode.log"
      done ;;
    w1)
      for quantization in ${W1_METHODS:-none fp8}; do
        flags=(--kv-cache-dtype "${W1_KV:-auto}")
        [ "$quantization" = none ] || flags+=(--quantization "$quantization")
        python3 loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
          --load-format dummy --dtype bfloat16 --device cuda --num-prompts 512 --min-len 128 \
          --max-len 1024 --new-tokens 256 --rounds 2 --no-hf --max-model-len 4096 \
          --full-warmup "${flags[@]}" --json "$OUT/w1-$quantization-kv${W1_KV:-auto}.json" 2>&1 \
          | tee -a "$OUT/w1.log"
      done ;;
    fp8gemm)
      python3 loadtests/gpu_fp8_gemm.py 2>&1 | tee "$OUT/fp8gemm.log" ;;
    breakdown)
      for quantization in ${W1_METHODS:-none fp8}; do
        flags=(--kv-cache-dtype "${W1_KV:-auto}")
        [ "$quantization" = none ] || flags+=(--quantization "$quantization")
        echo "=== breakdown $quantization, KV ${W1_KV:-auto}" | tee -a "$OUT/breakdown.log"
        (cd loadtests && python3 gpu_time_breakdown.py --model configs/llama3-8b --top 16 \
          "${flags[@]}") 2>&1 | tee -a "$OUT/breakdown.log"
      done ;;
    *) echo "unknown step $step (kernels, decode, w1, breakdown, fp8gemm)"; exit 2 ;;
  esac
done
