"""Accuracy per quantization method against the unquantized model on real text.

The embedded model (SmolLM2-135M-Instruct, its GGUF dequantized) in --dtype (bf16 on a GPU) is
the reference. Each method runs the same weights quantized its way:
  fp8                 quantized at load (per-channel weights, per-token activations);
  gguf                the file's own Q4_1 blocks held packed (the reference's exact values);
  gptq / awq / compressed-tensors W4A16
                      written by tests/engine/quantized_writers.py in each format's packing,
                      round to nearest in groups of 64 (gptq, compressed-tensors symmetric;
                      awq asymmetric; no calibration, so an upper bound on what GPTQ's and
                      AWQ's own algorithms give);
  w8a8-fp8 / w8a8-int8
                      compressed-tensors W8A8, per-channel weights, per-token activations.
Teacher-forced on a few paragraphs of prose: every prefix of the text gets one greedy token with
its top-20 logprobs (prefix caching makes this one prefill per paragraph). Reported per method:
agreement of the top token with the reference's, the mean absolute logprob difference over the
top-20 tokens both return, and the mean logprob of the text's true next token where both rank
it in their top 20. Writes $OUT/quantization_accuracy.json (or --json).

    python loadtests/quantization_accuracy.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TEXT = [
    "The river had been rising for three days before anyone in the valley took it seriously. "
    "By the time the school closed, the water had covered the lower road and the farmers were "
    "moving their animals to the hill behind the church.",
    "A compiler translates a program written in one language into another, usually a lower "
    "level one. It reads the source text, builds a tree that describes its structure, checks "
    "that the types agree, and finally emits instructions for the target machine.",
    "When you bake bread at home, the most common mistake is to add too much flour. The dough "
    "should feel slightly sticky after kneading; it firms up as it rests and the gluten forms.",
]
METHODS = ("fp8", "gguf", "gptq", "awq", "compressed-tensors", "w8a8-fp8", "w8a8-int8")


def build_checkpoint(method: str, source_dir: Path, folder: Path) -> str:
    """A folder for `method`'s pre-quantized checkpoint of the model in source_dir."""
    import importlib.util

    from safetensors.torch import load_file

    # By path: importing pagewire takes the checkout root off sys.path (import_roots.py).
    spec = importlib.util.spec_from_file_location(
        "quantized_writers", ROOT / "tests" / "engine" / "quantized_writers.py")
    writers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writers)
    write_quantized, write_w8a8 = writers.write_quantized, writers.write_w8a8
    config = json.loads((source_dir / "config.json").read_text())
    state = load_file(str(source_dir / "model.safetensors"))
    if method.startswith("w8a8-"):
        write_w8a8(folder, config, state, method.removeprefix("w8a8-").replace("fp8", "float")
                   .replace("int8", "int"), "channel")
    else:
        write_quantized(folder, config, state, method, bits=4, group=64,
                        symmetric=method != "awq")  # 64: the hidden size 576 is 9 x 64
    for name in os.listdir(source_dir):  # the tokenizer's files
        if name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
            shutil.copy(source_dir / name, folder / name)
    return str(folder)


def teacher_forced(llm, texts: list[str]) -> list[dict]:
    from pagewire import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts, truths = [], []
    for text in texts:
        ids = tokenizer.encode(text)
        for i in range(1, len(ids)):
            prompts.append({"prompt_token_ids": ids[:i]})
            truths.append(ids[i])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    return [{"top": {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()},
             "truth": truth} for o, truth in zip(outs, truths)]


def compare(ref: list[dict], got: list[dict]) -> dict:
    agree, diffs, truth_ref, truth_got = 0, [], [], []
    for a, b in zip(ref, got):
        agree += max(a["top"], key=a["top"].get) == max(b["top"], key=b["top"].get)
        common = set(a["top"]) & set(b["top"])
        diffs.append(statistics.mean(abs(a["top"][t] - b["top"][t]) for t in common))
        if a["truth"] in a["top"] and a["truth"] in b["top"]:
            truth_ref.append(a["top"][a["truth"]])
            truth_got.append(b["top"][a["truth"]])
    return {"positions": len(ref), "top1_agreement": agree / len(ref),
            "mean_abs_logprob_diff_top20": statistics.mean(diffs),
            "truth_logprob_ref": statistics.mean(truth_ref),
            "truth_logprob": statistics.mean(truth_got)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from pagewire import LLM
    from pagewire.model.model_source import resolve_model

    source_dir = Path(resolve_model(args.model).model_dir)
    common = {"device": args.device, "dtype": args.dtype, "kv_cache_memory_bytes": 256 << 20,
              "max_model_len": 1024, "show_progress": False}

    def run(**kwargs) -> tuple[list[dict], float]:
        llm = LLM(**common, **kwargs)
        model = llm.engine.runner.model
        gib = sum(t.numel() * t.element_size() for t in
                  [*model.parameters(), *model.buffers()]) / 2**30
        result = teacher_forced(llm, TEXT)
        del llm, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result, gib

    ref, ref_gib = run(model=args.model)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": args.dtype, "reference_weights_gib": ref_gib, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            if method in ("fp8", "gguf"):
                got, gib = run(model=args.model, quantization=method)
            else:
                got, gib = run(model=build_checkpoint(method, source_dir, Path(tmp) / method))
            row = {**compare(ref, got), "weights_gib": gib}
            report["methods"][method] = row
            print(json.dumps({"method": method, **row}), flush=True)
    path = args.json or (os.environ.get("OUT") and Path(os.environ["OUT"],
                                                        "quantization_accuracy.json"))
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
