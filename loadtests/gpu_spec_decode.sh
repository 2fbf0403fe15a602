# Issue 16 on one GPU: n-gram speculation against plain decoding on the embedded model's real
# weights in bf16 (random weights accept nothing), side by side on one engine.
#
# The embedded GGUF (94 MB) does not fit one device call's 64 MiB carry, so it travels in two
# halves on two calls to the same warm machine (within its 30 s idle window). A carried folder
# does not outlive its call there, /tmp does:
#   call 1: carry .gguf-a (its first 50 MiB), command
#           `mkdir -p /tmp/smol-a && cp .gguf-a/part-a /tmp/smol-a/`;
#   call 2: carry .gguf-b (the rest, and the gguf wheel transformers reads it with) and SNAPSHOT,
#           command `bash loadtests/gpu_spec_decode.sh [sweep|check]`.
# Make the halves with: head -c 52428800 FILE > .gguf-a/part-a; tail -c +52428801 FILE >
# .gguf-b/part-b (FILE: pagewire.model.model_source.embedded_gguf_path()).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/smol /tmp/site
first_half=.gguf-a/part-a
[ -f "$first_half" ] || first_half=/tmp/smol-a/part-a
cat "$first_half" .gguf-b/part-b > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gguf-b/*.whl
export PYTHONPATH=/tmp/site OFFLINE_ONLY=1
# shellcheck disable=SC1091
source loadtests/gpu_setup.sh
model=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
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
