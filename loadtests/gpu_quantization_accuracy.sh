# Issue 17's accuracy per method on one GPU (loadtests/quantization_accuracy.py): the embedded
# model's real weights in bf16 against each quantization method. The GGUF (94 MB) travels in
# two parts on two calls to the same warm machine, as for gpu_spec_decode.sh:
#   call 1: carry .gguf-a, command `mkdir -p /tmp/smol-a && cp .gguf-a/part-a /tmp/smol-a/`;
#   call 2: carry .gguf-b and SNAPSHOT, command `bash loadtests/gpu_quantization_accuracy.sh`.
# The offline engine needs nothing beyond the device image but the gguf wheel (in .gguf-b).
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
python3 loadtests/quantization_accuracy.py --model /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf \
  --device cuda --dtype bfloat16 2>&1 | tee "$OUT/accuracy.log"
