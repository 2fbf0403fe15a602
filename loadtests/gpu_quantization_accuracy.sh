# Issue 17's accuracy per method on one GPU (loadtests/quantization_accuracy.py): the embedded
# model's real weights in bf16 against each quantization method. The weights travel in two
# calls (loadtests/gpu_embedded_model.sh says how); the offline engine needs nothing beyond the
# device image but the gguf wheel (in .gguf-b).
set -euo pipefail
OUT=${OUT:-/tmp/out}
# shellcheck disable=SC1091
source loadtests/gpu_embedded_model.sh
python3 loadtests/quantization_accuracy.py --model "$EMBEDDED_GGUF" --device cuda \
  --dtype bfloat16 2>&1 | tee "$OUT/accuracy.log"
