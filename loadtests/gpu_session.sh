#!/usr/bin/env bash
# One device-tool call: the GPU checks and benchmarks of the engine, outputs under $OUT.
#   run: bash loadtests/gpu_session.sh [steps...]     (steps: kernels engine w1-llama w1-qwen
#        w1-llama-fp8 w1-qwen-fp8 w1-hf-full w1-hf-full-fp8 kv-fp8 breakdown-fp8 kernel-timing w1-llama-async w1-qwen-async w1-llama-512 w1-llama-512-16k w1-torch w1-hf w1-llama-8k graphs kv breakdown profile
#        profile-sync;
#        default: kernels engine w1-llama w1-qwen)
# Makes `pagewire` importable from this checkout without pip (the device has no index): the
# package-dir mapping of pyproject.toml, done with symlinks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagewire-gpu}
mkdir -p "$OUT" /tmp/pw
ln -sfn "$PWD/kernels" shared/kernels
ln -sfn "$PWD/services" shared/services
ln -sfn "$PWD/shared" /tmp/pw/pagewire
export PYTHONPATH=/tmp/pw:$PWD
# A step that runs past its time is killed with SIGABRT, so faulthandler prints where it was.
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
python() { timeout -s ABRT "${STEP_TIMEOUT_S:-400}" python3 "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

W1="--load-format dummy --dtype bfloat16 --device cuda --num-prompts 512 --min-len 128 \
--max-len 1024 --new-tokens 256 --rounds 1 --no-hf --max-model-len 4096"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels engine w1-llama w1-qwen)
for step in "${steps[@]}"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    kernels) python loadtests/gpu_kernels_check.py --skip-timing 2>&1 | tail -25 ;;
    engine) python loadtests/gpu_engine_check.py 2>&1 | tail -15 ;;
    # W1 at the offline defaults (the LLM class's: 1024 seqs, 16384 tokens a step on an H100),
    # then with an fp8 KV cache.
    w1-llama) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b $W1 \
                --full-warmup --json "$OUT/w1-llama3-8b-triton.json" 2>&1 | tail -8 ;;
    w1-qwen) python loadtests/offline_throughput.py --model loadtests/configs/qwen3-0.6b $W1 \
               --full-warmup --json "$OUT/w1-qwen3-0.6b-triton.json" 2>&1 | tail -8 ;;
    w1-llama-fp8) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
                    $W1 --full-warmup --kv-cache-dtype fp8 \
                    --json "$OUT/w1-llama3-8b-fp8-kv.json" 2>&1 | tail -8 ;;
    w1-qwen-fp8) python loadtests/offline_throughput.py --model loadtests/configs/qwen3-0.6b \
                   $W1 --full-warmup --kv-cache-dtype fp8 \
                   --json "$OUT/w1-qwen3-0.6b-fp8-kv.json" 2>&1 | tail -8 ;;
    # The whole W1 through pagewire, then through transformers' static batches of 128 (the
    # issue's reference) in the same process once pagewire's memory is freed.
    w1-hf-full) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
                  ${W1/--no-hf/} --full-warmup --hf-after --hf-batch 128 \
                  --json "$OUT/w1-llama3-8b-vs-hf-full.json" 2>&1 | tail -9 ;;
    w1-hf-full-fp8) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
                      ${W1/--no-hf/} --full-warmup --hf-after --hf-batch 128 \
                      --kv-cache-dtype fp8 \
                      --json "$OUT/w1-llama3-8b-fp8-kv-vs-hf-full.json" 2>&1 | tail -9 ;;
    # W1 with async scheduling on and off, round by round on one engine: the overlap's ratio.
    w1-llama-async) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
                      $W1 --async-scheduling both --full-warmup --rounds 2 \
                      --json "$OUT/w1-llama3-8b-async-vs-sync.json" 2>&1 | tail -9 ;;
    w1-qwen-async) python loadtests/offline_throughput.py --model loadtests/configs/qwen3-0.6b \
                     $W1 --async-scheduling both --full-warmup --rounds 2 \
                     --json "$OUT/w1-qwen3-0.6b-async-vs-sync.json" 2>&1 | tail -9 ;;
    # Bigger decode batches (fewer weight reads per token) and prefill chunks, async on.
    w1-llama-512) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
                    $W1 --full-warmup --max-num-seqs 512 \
                    --json "$OUT/w1-llama3-8b-512-seqs.json" 2>&1 | tail -6 ;;
    w1-llama-512-16k) python loadtests/offline_throughput.py \
                        --model loadtests/configs/llama3-8b $W1 --full-warmup \
                        --max-num-seqs 512 --max-num-batched-tokens 16384 \
                        --json "$OUT/w1-llama3-8b-512-seqs-16k.json" 2>&1 | tail -6 ;;
    w1-torch) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b $W1 \
                --kernels torch --json "$OUT/w1-llama3-8b-torch.json" 2>&1 | tail -8 ;;
    w1-llama-8k) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b $W1 \
                   --max-num-batched-tokens 8192 \
                   --json "$OUT/w1-llama3-8b-triton-8k.json" 2>&1 | tail -8 ;;
    # W1 at a quarter of the requests, pagewire beside transformers' static batches of 64 (128
    # runs out of memory beside pagewire's own weights and cache on one 80 GB GPU).
    w1-hf) python loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
             --load-format dummy --dtype bfloat16 --device cuda --num-prompts 128 --min-len 128 \
             --max-len 1024 --new-tokens 256 --rounds 1 --hf-batch 64 --max-model-len 4096 \
             --gpu-memory-utilization 0.35 --full-warmup \
             --json "$OUT/w1-small-llama3-8b-vs-hf.json" 2>&1 | tail -8 ;;
    graphs) python loadtests/gpu_graph_check.py 2>&1 | grep -v "^pagewire:" ;;
    kv) python loadtests/gpu_kv_check.py 2>&1 | grep -v "^pagewire:" ;;
    kv-fp8) python loadtests/gpu_kv_check.py --kv-cache-dtype fp8 2>&1 | grep -v "^pagewire:" ;;
    breakdown) python loadtests/gpu_time_breakdown.py 2>&1 | grep -v "^pagewire:" ;;
    breakdown-fp8) python loadtests/gpu_time_breakdown.py --kv-cache-dtype fp8 2>&1 \
                     | grep -v "^pagewire:" ;;
    kernel-timing) python loadtests/gpu_kernels_check.py --skip-checks --no-sweep --fp8-sweep 2>&1 \
                     | tail -40 ;;
    profile|profile-sync) python loadtests/profile_engine.py --model loadtests/configs/llama3-8b \
               --num-prompts 512 --max-num-batched-tokens 8192 --top 30 \
               --async-scheduling $([ $step = profile ] && echo on || echo off) 2>&1 \
               | grep -v "^pagewire:" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
