#!/usr/bin/env bash
# One device-tool call on two GPUs (issue 5): disaggregated serving (1 prefill + 1 decode worker)
# against colocated (2 workers doing both), one worker per GPU, the same model and workload;
# each swept over request rates and then over concurrency caps with `pagewire bench`; before
# that, the KV transfer alone against prompt length (kv_transfer.py). Outputs under $OUT:
# results.tar.gz (every JSON and PNG), the two comparison plots, table.md, log.txt.
#   run (device tool, kind nvidia-h200-x2, carry .whl and .redis; see loadtests/README.md):
#     bash loadtests/gpu_serving.sh
#   a small CPU rehearsal of the whole script:
#     SMOKE=1 bash loadtests/gpu_serving.sh
# Settings (environment): MODEL (a folder of loadtests/configs), RATES, CONCURRENCIES, PROMPTS,
# INPUT_LEN, OUTPUT_LEN, SLO_TTFT_MS, SLO_TPOT_MS, CONFIGS, VOCAB, WARMUP, KV_LENGTHS,
# SWEEP_LIMIT_S (the sweeps stop there, so the files are packed inside the call's 600 s).
# The device has no index: missing wheels come from .whl, redis-server and its libraries from
# .redis; `pagewire` is importable through symlinks (pyproject's package-dir mapping) in /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagewire-gpu-serving}
RES=/tmp/pw-serving-results
rm -rf "$RES" && mkdir -p "$OUT" "$RES"
exec > >(tee "$OUT/log.txt") 2>&1

if [ -n "${SMOKE:-}" ]; then  # the embedded-size shapes on CPU: does every step run?
  MODEL=${MODEL:-tiny} RATES=${RATES:-4 8} CONCURRENCIES=${CONCURRENCIES-2 4}
  PROMPTS=${PROMPTS:-6} INPUT_LEN=${INPUT_LEN:-64} OUTPUT_LEN=${OUTPUT_LEN:-8} VOCAB=1000
  WARMUP=${WARMUP:-4}
  GPU_FLAGS=(--kv-cache-bytes 67108864) KV_FLAGS=(--kv-cache-bytes 67108864)
  KV_LENGTHS=${KV_LENGTHS-64 256}
else
  GPU_FLAGS=(--worker-gpus 0,1 --kv-cache-bytes 0) KV_FLAGS=()
fi
MODEL=${MODEL:-llama3-8b}
RATES=${RATES:-2 4 8 16}
CONCURRENCIES=${CONCURRENCIES-16 64}  # empty: no concurrency sweep
KV_LENGTHS=${KV_LENGTHS-128 512 1024 2048 4096}  # kv_transfer.py's prompt lengths; empty: skip
PROMPTS=${PROMPTS:-64}
WARMUP=${WARMUP:-48}  # unrecorded requests first: Triton compiles, CUDA graphs get captured
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-128}
SLO_TTFT_MS=${SLO_TTFT_MS:-1000}
SLO_TPOT_MS=${SLO_TPOT_MS:-50}
CONFIGS=${CONFIGS:-colocated-2 disagg}  # colocated first: a cut-short run keeps both rate sweeps
VOCAB=${VOCAB:-32000}  # prompt ids are drawn below this

echo "=== setup $(date -u +%H:%M:%S)"
. loadtests/gpu_setup.sh || exit 1

MODEL_DIR=/tmp/pw-models/$MODEL
if [ "$MODEL" = tiny ]; then  # a two-layer Llama for the CPU rehearsal
  mkdir -p /tmp/pw-models/tiny-config
  python - <<'EOF'
import json
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
           "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu"},
          open("/tmp/pw-models/tiny-config/config.json", "w"))
EOF
  python loadtests/bench_model.py /tmp/pw-models/tiny-config "$MODEL_DIR" || exit 1
else
  python loadtests/bench_model.py "loadtests/configs/$MODEL" "$MODEL_DIR" || exit 1
fi

UTIL_PID=
if command -v nvidia-smi >/dev/null; then  # GPU use once a second, for the reading
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv -l 1 \
    > "$RES/gpu-utilization.csv" 2>/dev/null &
  UTIL_PID=$!
fi
if [ -n "$KV_LENGTHS" ]; then  # the transfer alone, one request at a time, both workers on GPU 0
  echo "=== kv transfer $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=0 timeout 120 python loadtests/kv_transfer.py --model "$MODEL_DIR" \
    --load-format dummy --lengths $KV_LENGTHS --repeats 3 --json "$RES/kv-transfer.json" \
    "${KV_FLAGS[@]}" 2>&1 | grep -v "^pagewire:"
fi
echo "=== sweeps $(date -u +%H:%M:%S)"
# shellcheck disable=SC2086  # the lists split on purpose
timeout "${SWEEP_LIMIT_S:-510}" python loadtests/serving_sweep.py --configs $CONFIGS \
  --model "$MODEL_DIR" --load-format dummy "${GPU_FLAGS[@]}" --rates $RATES \
  ${CONCURRENCIES:+--concurrencies $CONCURRENCIES} --warmup-prompts "$WARMUP" \
  --result-dir "$RES" --verbose -- \
  --num-prompts "$PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
  --vocab-size "$VOCAB" \
  --goodput "ttft:$SLO_TTFT_MS" "tpot:$SLO_TPOT_MS" --disable-tqdm
echo "=== sweeps done (code $?) $(date -u +%H:%M:%S)"
[ -n "$UTIL_PID" ] && kill "$UTIL_PID"

python loadtests/serving_table.py "$RES" --goodput "ttft:$SLO_TTFT_MS" "tpot:$SLO_TPOT_MS" \
  | tee "$OUT/table.md"
cp "$RES"/*-sweep.png "$OUT"/ 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$RES" .
ls -la "$OUT"
echo "=== done $(date -u +%H:%M:%S)"
