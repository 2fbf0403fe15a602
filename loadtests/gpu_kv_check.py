"""On CUDA: does a KV export survive its blocks being freed and reused at once?

start_kv_export queues the copy to pinned host memory behind the steps already launched and
returns; the prefill worker frees the blocks right away and waits for the copy on another
thread. Here engine A prefills prompts, copies each one's KV out once the plain way (waiting),
then starts a second export, releases the blocks and runs another batch that reuses them before
anyone waits. The second copies must equal the first bit for bit. Engine B then imports them and
decodes; its tokens are compared with B's own greedy run of the same prompts (batches differ, so
bf16 near-ties may flip a token: reported, not required).

    python loadtests/gpu_kv_check.py --model loadtests/configs/qwen3-0.6b
"""

from __future__ import annotations

import argparse
import sys

import torch
from offline_throughput import make_prompts

from pagewire import LLM, SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="loadtests/configs/qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    args = parser.parse_args()
    make = dict(model=args.model, load_format="dummy", device=args.device, max_model_len=4096,
                kv_cache_memory_bytes=4 << 30, show_progress=False, async_scheduling=True,
                kv_cache_dtype=args.kv_cache_dtype)
    sender, receiver = LLM(**make), LLM(**make)
    vocab = sender.engine.runner.spec.vocab_size
    prompts = make_prompts(args.num_prompts, 64, 1024, vocab, 1)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [o.outputs[0].token_ids
                for o in receiver.generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                          use_tqdm=False)]
    receiver.reset_prefix_cache()

    a = sender.engine
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        a.add_request(str(i), prompt, first, hold_kv=True)
    first_tokens = {}
    while a.has_unfinished_requests():
        for output in a.step():
            if output.finished:
                first_tokens[output.request_id] = output.outputs[0].token_ids[0]
    # (The sender holds every prompt's blocks until its export: the cache must fit them all.)
    waited = {rid: a.export_kv_blocks(rid) for rid in first_tokens}
    exports = {rid: a.start_kv_export(rid) for rid in first_tokens}
    for rid in first_tokens:
        a.release(rid)
    sender.reset_prefix_cache()  # the freed blocks are now anyone's: overwrite them
    sender.generate([{"prompt_token_ids": p} for p in make_prompts(64, 256, 1024, vocab, 2)],
                    greedy, use_tqdm=False)
    exact = sum(torch.equal(_bytes(exports[rid].wait()), _bytes(waited[rid][1]))
                for rid in first_tokens)
    print(f"exports started, then blocks freed and reused: {exact}/{len(prompts)} bit-exact "
          "copies of the KV")

    b = receiver.engine
    for rid, export in exports.items():
        b.import_kv_blocks(rid, prompts[int(rid)], [first_tokens[rid]], a.kv_layout,
                           export.num_tokens, 0, export.wait(), greedy)
    got = {}
    while b.has_unfinished_requests():
        for output in b.step():
            if output.finished:
                got[int(output.request_id)] = output.outputs[0].token_ids
    agree = sum(_agreeing_prefix(got[i], expected[i]) for i in range(len(prompts)))
    print(f"B decoding the imported KV: {agree / sum(map(len, expected)):.1%} of tokens equal "
          "B's own run before the first divergence")
    ok = exact == len(prompts)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _bytes(blocks: torch.Tensor) -> torch.Tensor:
    """The raw bytes: torch compares no fp8 tensors."""
    return blocks.view(torch.uint8)


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
