"""Speculative decoding's speedup, side by side on one engine: output tokens/s of greedy
decoding with and without speculation, in turns, on prompts whose answers repeat them (a code
edits, quotes from a text), over a sweep of batch sizes (issue 16: n-gram at least
1.5x at batch 1; at batch 256 on a GPU no more than 3% slower than without it).

One engine serves both modes (the speculator is switched off for the baseline), so weights,
cache and kernels are the same. `--force` keeps speculation on at every batch size (to find
where it stops paying, which sets spec_decode.speculator.DISABLE_BY_BATCH_SIZE); without it
the engine's threshold applies, as users get it.

    python loadtests/spec_decode_bench.py                         # embedded model, CPU
    python loadtests/spec_decode_bench.py --batch-sizes 1,2,4,8 --force --json out.json
    python loadtests/spec_decode_bench.py --model DIR --dtype bfloat16 --batch-sizes 1,256
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time

CODE = '''def load_orders(path):
    orders = []
    with open(path) as f:
        for line in f:
            order_id, customer, amount = line.strip().split(",")
            orders.append({"id": order_id, "customer": customer, "amount": float(amount)})
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        totals[order["customer"]] = totals.get(order["customer"], 0.0) + order["amount"]
    return totals


def biggest_customer(orders):
    totals = total_by_customer(orders)
    return max(totals, key=totals.get)
'''
TEXT = ("The committee met on Tuesday. After a long debate, it decided that the new library "
        "will open in March, that entry will stay free for everyone under eighteen, and that "
        "the old reading room will become a space for children. The chair said: \"We want the "
        "library to be the living room of the town, open late and open to all.\" The budget "
        "of two million will come from the town and from a regional grant.")
# Edits and quotes whose answers the embedded model does write out again (measured: the n-gram
# drafts of these are accepted 59-84% of the time at temperature 0); a request to summarise or
# rename in prose was answered in new words (36% accepted), which no lookup can predict.
PROMPTS = [
    "Here is a Python file. Change the name of the variable `orders` to `sales` and write out "
    "the whole file again:\n\n" + CODE,
    "Here is a Python file. Add the comment `# Orders report` as its first line and write out "
    "the whole file again:\n\n" + CODE,
    "Here is a Python file. Rename the function `biggest_customer` to `top_customer` and write "
    "out the whole file again:\n\n" + CODE,
    "Quote the chair's words from this text exactly, then quote the sentence about the "
    "budget:\n\n" + TEXT,
]


def run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from pagewire import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--force", action="store_true",
                        help="speculate at every batch size (ignore the engine's threshold)")
    parser.add_argument("--profile", action="store_true",
                        help="after the sweep, cProfile batch 1 in both modes (host time)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from pagewire import LLM

    spec_config = {"method": "ngram", "num_speculative_tokens": args.k,
                   "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if args.force:
        spec_config["disable_by_batch_size"] = 1 << 20
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, show_progress=False,
              speculative_config=spec_config)
    engine = llm.engine
    speculator = engine.speculator
    chats = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    run(llm, chats, 16)  # warm-up (kernels compile, graphs capture)
    engine.speculator = None
    run(llm, chats, 16)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        # Every prompt leads one batch of `batch` requests (cycling through the others), so
        # batch 1 measures each workload alone.
        groups = [[chats[(g + i) % len(chats)] for i in range(batch)] for g in range(len(chats))]
        rates: dict[str, list[float]] = {"plain": [], "ngram": []}
        answers: dict[str, list[list[int]]] = {}
        before = (speculator.stats.num_draft_tokens, speculator.stats.num_accepted_tokens,
                  speculator.stats.num_drafts)
        for _ in range(args.rounds):  # in turns: the machine's drift hits both
            for mode in rates:
                engine.speculator = speculator if mode == "ngram" else None
                elapsed, answers[mode] = 0.0, []
                for prompts in groups:
                    llm.reset_prefix_cache()
                    seconds, outputs = run(llm, prompts, args.max_tokens)
                    elapsed += seconds
                    answers[mode] += outputs
                rates[mode].append(sum(map(len, answers[mode])) / elapsed)
        drafted = speculator.stats.num_draft_tokens - before[0]
        accepted = speculator.stats.num_accepted_tokens - before[1]
        verifies = speculator.stats.num_drafts - before[2]
        plain, ngram = statistics.median(rates["plain"]), statistics.median(rates["ngram"])
        row = {"batch": batch, "plain_tok_s": plain, "ngram_tok_s": ngram,
               "speedup": ngram / plain, "acceptance_rate": accepted / drafted if drafted else 0,
               "accepted_per_verify": accepted / verifies if verifies else 0,
               # Greedy answers equal token for token (a near-tie may flip where the verify
               # and decode kernels round differently: counted, not hidden).
               "same_answers": sum(a == b for a, b in zip(answers["plain"], answers["ngram"])),
               "rates": rates}
        results.append(row)
        print(f"batch {batch:4d}: plain {plain:9.1f} tok/s  ngram {ngram:9.1f} tok/s  "
              f"{ngram / plain:5.2f}x  acceptance {row['acceptance_rate']:.0%}  "
              f"{row['accepted_per_verify']:.2f} accepted per verify  "
              f"{row['same_answers']}/{len(answers['plain'])} answers equal", flush=True)
    if args.profile:
        for mode in ("plain", "ngram"):
            engine.speculator = speculator if mode == "ngram" else None
            profile = cProfile.Profile()
            profile.enable()
            for prompt in chats:
                run(llm, [prompt], args.max_tokens)
            profile.disable()
            print(f"---- {mode}, batch 1: host time by function")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "device": engine.config.device, "dtype": str(engine.config.torch_dtype),
                       "disable_by_batch_size": speculator.disable_by_batch_size,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
