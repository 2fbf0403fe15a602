"""Where an offline run's time goes: the W1 workload (or a slice of it) under cProfile.

On CUDA the host waits for the device only where a result is read (the sampled token ids), so
the time under that read is device time the host could not hide; everything else on the host is
Python and launch overhead. Prints the step count, the mean batch shape, and the functions
with the most own and cumulative time.

    python loadtests/profile_engine.py --model loadtests/configs/llama3-8b --num-prompts 128
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from offline_throughput import make_prompts, sync


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    args = parser.parse_args()

    from pagewire import LLM, SamplingParams

    llm = LLM(model=args.model, load_format="dummy", dtype="auto", device=args.device,
              max_model_len=4096, max_num_batched_tokens=args.max_num_batched_tokens,
              kernels=args.kernels, show_progress=False,
              async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling])
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len,
                           llm.engine.runner.spec.vocab_size, 0)
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()
    stats = llm.engine.stats
    steps0, tokens0 = stats.num_steps, stats.num_computed_tokens
    sync(args.device)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm.generate(requests, params, use_tqdm=False)
    sync(args.device)
    profile.disable()
    elapsed = time.perf_counter() - start
    steps = stats.num_steps - steps0
    out_tokens = args.num_prompts * args.new_tokens
    print(f"{elapsed:.1f} s, {out_tokens / elapsed:.0f} output tok/s, {steps} steps, "
          f"{1000 * elapsed / steps:.1f} ms/step, "
          f"{(stats.num_computed_tokens - tokens0) / steps:.0f} tokens/step")
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(args.top)
        print(f"--- by {key}")
        print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
