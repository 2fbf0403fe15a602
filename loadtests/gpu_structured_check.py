"""Structured outputs on a GPU: the bitmask applied on the device, JSON that validates, and what
constraining every request costs the offline workload there (issue 15).

Random weights of a real config with bench_model.py's synthetic byte-level tokenizer: the text is
nonsense, but the grammar must still hold it to the schema. Prints whether every finished answer
parses and matches, then free against constrained tokens/s on the same prompts (in turns).

    python loadtests/bench_model.py loadtests/configs/qwen3-0.6b /tmp/qwen3-bench
    python loadtests/gpu_structured_check.py --model /tmp/qwen3-bench --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from offline_throughput import make_prompts  # beside this script

CHECKED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
    "ok": {"type": "boolean"}}, "required": ["name", "tags", "ok"]}
# For the rate: cannot complete within the new tokens, so both modes compute as many tokens.
LONG = {"type": "array", "minItems": 40, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
    "required": ["id", "name"]}}


def matches_checked(value) -> bool:
    """CHECKED by hand (the device has no jsonschema)."""
    return (isinstance(value, dict) and set(value) == {"name", "tags", "ok"}
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(t in ("a", "b", "c") for t in value["tags"])
            and isinstance(value["ok"], bool))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from pagewire import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", max_model_len=2048,
              show_progress=False)
    vocab = llm.engine.runner.spec.vocab_size
    prompts = make_prompts(args.num_prompts, 32, 256, vocab, seed=0)
    checked = llm.generate([{"prompt_token_ids": p} for p in prompts[:64]], SamplingParams(
        temperature=0.8, seed=1, max_tokens=256,
        structured_outputs=StructuredOutputsParams(json=CHECKED)), use_tqdm=False)
    finished = [o.outputs[0] for o in checked if o.outputs[0].finish_reason == "stop"]
    # strict=False: with bench_model.py's synthetic tokenizer xgrammar lets byte tokens of
    # control characters into strings (the embedded model's real tokenizer gets none: checked
    # on CPU); the structure is what this checks.
    valid = sum(matches_checked(json.loads(o.text, strict=False)) for o in finished)
    print(f"checked: {len(finished)} of {len(checked)} answers finished, {valid} valid")

    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up (Triton compiles each new shape)
        for mode in rates:
            structured = StructuredOutputsParams(json=LONG) if mode == "json_schema" else None
            params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                                    structured_outputs=structured)
            llm.reset_prefix_cache()
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rate = tokens / (time.perf_counter() - start)
            print(f"{mode:<11} {rate:9.1f} tok/s{' (warm-up)' if round_ == 0 else ''}",
                  flush=True)
            if round_:
                rates[mode].append(rate)
    ratio = statistics.median(rates["json_schema"]) / statistics.median(rates["free"])
    print(f"constrained / free: {ratio:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "finished": len(finished), "valid": valid, "checked": len(checked),
                       "tokens_per_s": rates, "ratio": ratio}, f, indent=2)
    return 0 if valid == len(finished) else 1


if __name__ == "__main__":
    raise SystemExit(main())
