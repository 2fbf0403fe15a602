"""On CUDA: do decode steps replayed from CUDA graphs give what eager steps give, and how much
faster are they? The same dummy-weight model runs the same greedy batch eager and with graphs,
then with graphs and async scheduling off: the same kernels on the same shapes, so its tokens
must equal the async run's exactly.

Graph batches are padded to a captured size, so GEMMs may tile differently and bf16 rounding
can differ in the last bit; tokens must agree except after such a near-tie, and the sampled
tokens' logprobs must agree closely where the tokens do.

    python loadtests/gpu_graph_check.py --model loadtests/configs/qwen3-0.6b
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from offline_throughput import make_prompts


def run(model: str, enforce_eager: bool, prompts, new_tokens: int, async_scheduling=True):
    from pagewire import LLM, SamplingParams

    llm = LLM(model=model, load_format="dummy", device="cuda", max_model_len=4096,
              kv_cache_memory_bytes=8 << 30, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up: compiles, captures
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outputs], elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="loadtests/configs/qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = make_prompts(args.num_prompts, 16, 512, 32000, 0)
    eager, eager_s = run(args.model, True, prompts, args.new_tokens)
    graphs, graphs_s = run(args.model, False, prompts, args.new_tokens)
    plain, plain_s = run(args.model, False, prompts, args.new_tokens, async_scheduling=False)
    same, total, worst = 0, 0, 0.0
    for a, b in zip(eager, graphs):
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                break
            same += 1
            worst = max(worst, abs(a.logprobs[i][x].logprob - b.logprobs[i][y].logprob))
        total += len(a.token_ids)
    tokens = args.num_prompts * args.new_tokens
    print(f"eager  {tokens / eager_s:8.0f} tok/s\ngraphs {tokens / graphs_s:8.0f} tok/s  "
          f"({eager_s / graphs_s:.2f}x)\ngraphs, async scheduling off {tokens / plain_s:8.0f} "
          f"tok/s (async {plain_s / graphs_s:.2f}x)")
    async_exact = [a.token_ids for a in graphs] == [b.token_ids for b in plain]
    print(f"async scheduling gives the plain loop's tokens exactly: {async_exact}")
    agreement = same / total
    print(f"tokens equal before the first divergence: {agreement:.1%}; "
          f"max |logprob diff| there: {worst:.3f}")
    ok = agreement >= 0.8 and worst < 0.1 and async_exact
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
