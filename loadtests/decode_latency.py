"""Time per decode step at small batch sizes: the weight-read-bound regime where weight-only
quantization pays. One engine (one model load); for each batch size B, B prompts of
--prompt-len tokens generate --new-tokens tokens each, all in one batch (max_num_seqs = the
largest B); a warm-up run of the same batch first (graph captures, kernel compiles). Reports
ms per step (wall time / new tokens: prefill is a few percent of it and included) and output
tok/s, median of --rounds, and the weights' GiB.

    python loadtests/decode_latency.py --model loadtests/configs/llama3-8b-w4a16 \
        --load-format dummy --dtype bfloat16 --batches 1 4 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from offline_throughput import machine_description


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pagewire import LLM, SamplingParams

    kwargs = {} if args.device is None else {"device": args.device}
    llm = LLM(model=args.model, load_format=args.load_format, dtype=args.dtype,
              quantization=args.quantization, max_num_seqs=max(args.batches),
              max_model_len=args.max_model_len, show_progress=False, **kwargs)
    runner = llm.engine.runner
    vocab = runner.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for batch in args.batches:
        prompts = [{"prompt_token_ids": [(7 + 13 * i + 31 * j) % (vocab - 1) + 1
                                         for j in range(args.prompt_len)]}
                   for i in range(batch)]
        llm.generate(prompts, params)  # warm-up: this batch size's graphs and kernels
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            times.append(time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
        seconds = statistics.median(times)
        row = {"batch": batch, "ms_per_step": seconds / args.new_tokens * 1e3,
               "output_tokens_per_s": batch * args.new_tokens / seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine_description(str(runner.device)),
        "command": " ".join(sys.argv), "model": llm.engine.source.name,
        "quantization": runner.config.quantization, "dtype": str(runner.config.torch_dtype),
        "weights_gib": sum(t.numel() * t.element_size() for t in
                           [*runner.model.parameters(), *runner.model.buffers()]) / 2**30,
        "rows": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
