#!/usr/bin/env bash
# Issue 14 on one GPU: a prefill and a decode worker on the same GPU, Llama-3-8B shapes (dummy
# weights, bf16), 1,024-token prompts. Steps (default: kv itl; ttft in a call of its own):
#   kv    the transfer alone, per transport (kv_transfer.py: cuda_ipc, nixl, grpc): bytes/s,
#         push share of TTFT, and the same tokens from every transport
#   itl   the decode worker's ITL with and without KV arriving (itl_under_transfers.py, cuda_ipc)
#   ttft  low-load TTFT of 1P1D (cuda_ipc) against one colocated worker (serving_sweep.py)
# Outputs under $OUT: *.json, log.txt, device.txt.
#   run (device tool, carry .whl .redis .nixl; see loadtests/README.md):
#     bash loadtests/gpu_kv_transports.sh kv itl
#   a CPU rehearsal with the embedded model (shm in place of cuda_ipc):
#     SMOKE=1 bash loadtests/gpu_kv_transports.sh kv itl ttft
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagewire-gpu-kv}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "=== setup $(date -u +%H:%M:%S)"
. loadtests/gpu_setup.sh || exit 1
export PYTHONFAULTHANDLER=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kv itl)

if [ -n "${SMOKE:-}" ]; then
  MODEL_FLAGS=() DIRECT=shm LENGTHS="128" STREAMS=2 PHASE_S=8 PROMPTS=4 KV=1073741824
  KV_TRANSPORTS="shm nixl grpc" VOCAB=30000 INPUT_LEN=128 OUTPUT_LEN=8
else
  python3 loadtests/bench_model.py loadtests/configs/llama3-8b /tmp/pw-models/llama3-8b || exit 1
  MODEL_FLAGS=(--model /tmp/pw-models/llama3-8b --load-format dummy)
  DIRECT=${DIRECT:-cuda_ipc} LENGTHS="1024 4096" STREAMS=16 PHASE_S=20 PROMPTS=24 KV=8589934592
  KV_TRANSPORTS="cuda_ipc grpc nixl" VOCAB=32000 INPUT_LEN=1024 OUTPUT_LEN=128
fi
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    # shellcheck disable=SC2086  # the lists split on purpose
    kv) timeout -s INT 300 python3 loadtests/kv_transfer.py "${MODEL_FLAGS[@]}" \
          --transports $KV_TRANSPORTS --lengths $LENGTHS --repeats 5 --kv-cache-bytes "$KV" \
          --vocab "$VOCAB" --json "$OUT/kv-transfer.json" 2>&1 | grep -v "INFO" ;;
    itl) timeout -s INT 210 python3 loadtests/itl_under_transfers.py "${MODEL_FLAGS[@]}" \
           --kv-transports "$DIRECT" --kv-cache-bytes "$KV" --streams "$STREAMS" \
           --phase-s "$PHASE_S" --arrival-rate 2 --prompt-len "${LENGTHS%% *}" \
           --vocab "$VOCAB" --json "$OUT/itl-under-transfers-$DIRECT.json" ;;
    ttft) timeout -s INT 540 python3 loadtests/serving_sweep.py --configs colocated disagg \
            "${MODEL_FLAGS[@]}" --kv-cache-bytes "$KV" --kv-transports "$DIRECT" --rates 1 \
            --warmup-prompts 8 --result-dir /tmp/pw-ttft -- --num-prompts "$PROMPTS" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --vocab-size "$VOCAB" \
            --disable-tqdm
          python3 loadtests/serving_table.py /tmp/pw-ttft | tee "$OUT/ttft-table.md"
          tar czf "$OUT/ttft.tar.gz" -C /tmp/pw-ttft . ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
