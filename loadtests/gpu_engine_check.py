"""On a CUDA device: does the engine's one code path run in bf16, and how close is it to
transformers on the same weights? Prints relative logit errors against a float32 reference of
the same weights, beside transformers' own bf16 error on them (the bound: ours may be at most
1.5x theirs, since rounding the weights to bf16 alone costs that much), and the greedy-token
agreement of a short generation.

    python loadtests/gpu_engine_check.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from pagewire import LLM, SamplingParams
from pagewire.model.attention import build_attention_metadata

CONFIGS = {
    "llama-1b-ish": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                                num_attention_heads=32, num_key_value_heads=8,
                                vocab_size=32000, max_position_embeddings=4096),
    "qwen3-small": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                               vocab_size=32000, max_position_embeddings=4096,
                               tie_word_embeddings=True),
}


def check(name: str, config) -> tuple[float, float, float]:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, param in hf.named_parameters():
            if "norm" in pname:
                param.uniform_(0.5, 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        llm = LLM(model=tmp, dtype="bfloat16", device="cuda", show_progress=False,
                  kv_cache_memory_bytes=1 << 30)
    hf = hf.cuda()
    runner = llm.engine.runner
    ids = torch.randint(0, config.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    # Prefill of 299 tokens, then one decode token, through the engine's own model path.
    bs = runner.config.block_size
    table = list(range(-(-300 // bs)))
    with torch.inference_mode():
        meta = build_attention_metadata([299], [299], [table], bs, "cuda")
        hidden = runner.model(ids[:299].cuda(), torch.arange(299, device="cuda"),
                              runner.layer_caches, meta)
        prefill_logits = runner.model.compute_logits(hidden)
        meta = build_attention_metadata([1], [300], [table], bs, "cuda")
        hidden = runner.model(ids[299:].cuda(), torch.tensor([299], device="cuda"),
                              runner.layer_caches, meta)
        decode_logits = runner.model.compute_logits(hidden)
        ref = hf(ids[None].cuda()).logits[0].float()
        hf_bf16 = hf.to(torch.bfloat16)(ids[None].cuda()).logits[0].float()
        hf.float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    prefill_err, decode_err = rel(prefill_logits, ref[:299]), rel(decode_logits[0], ref[299])
    hf_err = rel(hf_bf16, ref)
    assert torch.isfinite(prefill_logits).all() and torch.isfinite(decode_logits).all()
    prompts = [ids[:n].tolist() for n in (20, 77, 150)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    agree = total = 0
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            gen = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            ref_tokens = gen[0, len(p):].tolist()
            # agreement up to the first divergence (bf16 vs float32 may flip near-ties)
            for a, b in zip(o.outputs[0].token_ids, ref_tokens):
                if a != b:
                    break
                agree += 1
            total += 16
    del llm
    torch.cuda.empty_cache()
    return prefill_err, decode_err, hf_err, agree / total


def main() -> int:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'model':<16}{'prefill err':>12}{'decode err':>12}{'HF bf16 err':>12}"
          f"{'greedy agree':>14}")
    ok = True
    for name, config in CONFIGS.items():
        prefill_err, decode_err, hf_err, agree = check(name, config)
        print(f"{name:<16}{prefill_err:>12.2e}{decode_err:>12.2e}{hf_err:>12.2e}{agree:>14.0%}")
        ok &= max(prefill_err, decode_err) <= 1.5 * hf_err
    print("PASS" if ok else "FAIL: bf16 error above 1.5x transformers' own bf16 error")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
