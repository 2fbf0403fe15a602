# Issue 19's tensor-parallel run, for a machine of two or more GPUs (kind nvidia-h100-x2 or
# larger; not lent when written): W1 (Llama-3-8B shapes, dummy weights) at TP=1 on one GPU and
# TP=2 on two, one process group each, one after the other; scaling efficiency is
# tok/s(TP=2) / (2 x tok/s(TP=1)). Then, where four GPUs are lent, Llama-3-70B shapes at TP=4
# (they do not fit one GPU in bf16): that it serves at all, and its W1 throughput.
#   bash loadtests/gpu_tensor_parallel.sh [tp1 tp2 pp2 tp4-70b]
# (tp2 alternates async scheduling off and on, round by round on one engine: it is off by
# default under parallelism until this measures it; pp2: Llama-3-8B in two pipeline stages on
# two GPUs, one step in the pipeline against two micro-batches, the same way.)
# Step `before` (issue 18's "TP=1 loses nothing", one GPU): W1 from the engine as it was before
# tensor parallelism, a tree carried in .before/ (gitignored), made with
#   mkdir .before && git archive 82857b3 shared kernels services loadtests | tar x -C .before
# run it beside `tp1` on the same warm machine: the two figures must be within 2%.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OFFLINE_ONLY=1
# shellcheck disable=SC1091
source loadtests/gpu_setup.sh
w1() {  # model, tp, label, flags...
  python3 loadtests/offline_throughput.py --model "$1" --load-format dummy --dtype bfloat16 \
    --device cuda --num-prompts 512 --min-len 128 --max-len 1024 --new-tokens 256 --rounds 2 \
    --no-hf --max-model-len 4096 --full-warmup --tensor-parallel-size "$2" \
    --json "$OUT/w1-$3.json" "${@:4}" 2>&1 | tee -a "$OUT/tp.log"
}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tp1 tp2)
for step in "${steps[@]}"; do
  case "$step" in
    before)  # the old script has no --tensor-parallel-size; its own gpu_setup links its tree
      (cd .before && source loadtests/gpu_setup.sh && python3 loadtests/offline_throughput.py \
        --model loadtests/configs/llama3-8b --load-format dummy --dtype bfloat16 --device cuda \
        --num-prompts 512 --min-len 128 --max-len 1024 --new-tokens 256 --rounds 2 --no-hf \
        --max-model-len 4096 --full-warmup --json "$OUT/w1-before.json" 2>&1 \
        | tee -a "$OUT/tp.log")
      source loadtests/gpu_setup.sh ;;  # links this tree again
    tp1) w1 loadtests/configs/llama3-8b 1 tp1 ;;
    tp2) w1 loadtests/configs/llama3-8b 2 tp2 --async-scheduling both ;;  # off by default
    pp2)  # two stages, one GPU each: one step in the pipeline against two micro-batches
      python3 loadtests/offline_throughput.py --model loadtests/configs/llama3-8b \
        --load-format dummy --dtype bfloat16 --device cuda --num-prompts 512 --min-len 128 \
        --max-len 1024 --new-tokens 256 --rounds 2 --no-hf --max-model-len 4096 --full-warmup \
        --pipeline-parallel-size 2 --async-scheduling both --json "$OUT/w1-pp2.json" 2>&1 \
        | tee -a "$OUT/tp.log" ;;
    tp4-70b) w1 loadtests/configs/llama3-70b 4 tp4-70b ;;
    *) echo "unknown step $step (before, tp1, tp2, pp2, tp4-70b)"; exit 2 ;;
  esac
done
