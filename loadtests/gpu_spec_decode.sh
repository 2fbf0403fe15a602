# Issue 16 on one GPU: n-gram speculation against plain decoding on the embedded model's real
# weights in bf16 (random weights accept nothing), side by side on one engine.
#
# The weights travel in two calls: loadtests/gpu_embedded_model.sh says how.
set -euo pipefail
OUT=${OUT:-/tmp/out}
# shellcheck disable=SC1091
source loadtests/gpu_embedded_model.sh
model=$EMBEDDED_GGUF
# Step 1 (--force, a host profile of batch 1, k=8, float32): where speculation pays, and
# whether greedy answers are equal where rounding cannot differ. Step 2 (`check`): the
# engine's threshold as users get it, batch 256 in 7 rounds of 256 tokens (its rates vary by
# +-20% between rounds), and float32 equality at bigger batches.
if [ "${1:-sweep}" = sweep ]; then
python3 loadtests/spec_decode_bench.py --model "$model" --dtype bfloat16 --force --profile \
  --batch-sizes 1,2,4,8,16,32 --json "$OUT/spec-decode-force.json" 2>&1 | tee "$OUT/spec.log"
python3 loadtests/spec_decode_bench.py --model "$model" --dtype bfloat16 --force --k 8 \
  --batch-sizes 1,4 --json "$OUT/spec-decode-k8.json" 2>&1 | tee -a "$OUT/spec.log"
python3 loadtests/spec_decode_bench.py --model "$model" --dtype float32 --force --rounds 1 \
  --batch-sizes 1,8 --json "$OUT/spec-decode-fp32.json" 2>&1 | tee -a "$OUT/spec.log"
else
python3 loadtests/spec_decode_bench.py --model "$model" --dtype bfloat16 --rounds 7 \
  --max-tokens 256 --batch-sizes 1,256 --json "$OUT/spec-decode-default.json" 2>&1 \
  | tee "$OUT/spec.log"
python3 loadtests/spec_decode_bench.py --model "$model" --dtype float32 --force --rounds 1 \
  --batch-sizes 16,32 --json "$OUT/spec-decode-fp32-big.json" 2>&1 | tee -a "$OUT/spec.log"
fi
