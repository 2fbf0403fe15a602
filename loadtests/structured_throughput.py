"""Constrained decoding's cost: the offline workload with a JSON schema on every request against
the same workload free, on one engine, in turns (issue 15: at least 90% of the free rate).

The schema asks for a list of at least 20 {"id", "name"} objects, which no answer completes
within `--new-tokens`: every sequence runs to its length in both modes, so both compute the same
tokens and only the grammar's work differs (a bitmask filled per sequence per step, applied to
the logits, each sampled token advanced through its matcher).

    python loadtests/structured_throughput.py                    # embedded model, CPU
    python loadtests/structured_throughput.py --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from offline_throughput import make_prompts  # beside this script

SCHEMA = {"type": "array", "minItems": 20, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
    "required": ["id", "name"]}}


def run(llm, prompts, new_tokens: int, constrained: bool) -> tuple[float, int]:
    from pagewire import SamplingParams, StructuredOutputsParams

    structured = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True,
                            structured_outputs=structured)
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if constrained:  # the grammar held: every answer is a prefix of a valid list
        assert all(o.outputs[0].text.startswith("[{") for o in outs), outs[0].outputs[0].text
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs), "a sequence ended early"
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from pagewire import LLM

    llm = LLM(kv_cache_memory_bytes=256 << 20, max_model_len=1024, show_progress=False)
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, 30000, seed=0)
    run(llm, prompts[:4], 8, True)  # warm-up: the grammar compiles, the CPU kernel loads
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    for _ in range(args.rounds):  # in turns: the machine's drift hits both
        for mode in rates:
            elapsed, tokens = run(llm, prompts, args.new_tokens, mode == "json_schema")
            rates[mode].append(tokens / elapsed)
    free, constrained = (statistics.median(rates[m]) for m in rates)
    for mode, median in (("free", free), ("json_schema", constrained)):
        rounds = ", ".join(f"{r:.1f}" for r in rates[mode])
        print(f"{mode:<11} {median:8.1f} tok/s  (rounds: {rounds})")
    print(f"constrained / free: {constrained / free:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "schema": SCHEMA, "tokens_per_s": rates,
                       "ratio": constrained / free}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
