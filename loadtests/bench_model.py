"""A servable model directory for benchmarks on dummy weights: a real config.json beside a
synthetic tokenizer with exactly the config's vocabulary.

The serving stack needs a tokenizer (the tokenizer service loads one; the gateway detokenizes
every output token), and `loadtests/configs/` holds configs only: no tokenizer of Llama-3 or
Qwen3 may come from a hub. Dummy weights sample any id below `vocab_size`, so the tokenizer must
decode every one of them. This one is byte-level BPE: ids 0-255 are the 256 bytes, in GPT-2's
byte-to-character alphabet; every later id is a made-up word (" ba", " bb", ...); the config's
BOS and EOS ids are special tokens (one below 256 takes its byte's place). Text encodes byte by
byte (no merges), so benchmarks should send token-id prompts (`pagewire bench --prompt-format
ids`, the default). Output text is readable nonsense, one word per token.

    python loadtests/bench_model.py loadtests/configs/llama3-8b /tmp/llama3-8b-bench
    pagewire up --model /tmp/llama3-8b-bench --load-format dummy
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character of each byte, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def made_up_word(index: int) -> str:
    """" ba", " bb", ... " zz", " baa", ...: distinct for every index, never a single letter (so
    never a byte's own spelling). "Ġ" is the byte alphabet's space."""
    letters, n = "", index + len(LETTERS)  # start at two letters
    while n:
        n, r = divmod(n, len(LETTERS))
        letters = LETTERS[r] + letters
    return "Ġ" + letters


def special_ids(config: dict) -> dict[int, str]:
    ids: dict[int, str] = {}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = config.get(key)
        for token_id in value if isinstance(value, list) else [value] if value is not None else []:
            ids.setdefault(token_id, f"<|{name}_{token_id}|>")
    return ids


def build_tokenizer(config: dict) -> tuple[Tokenizer, dict[int, str]]:
    vocab_size = config["vocab_size"]
    specials = special_ids(config)
    vocab: dict[str, int] = {}
    alphabet = byte_alphabet()
    for token_id in range(vocab_size):
        if token_id in specials:  # before bytes: a special id below 256 leaves its byte out
            vocab[specials[token_id]] = token_id
        elif token_id < 256:
            vocab[alphabet[token_id]] = token_id
        else:
            vocab[made_up_word(token_id - 256)] = token_id
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials.values()))  # already in the vocab: ids kept
    return tokenizer, specials


def write_model_dir(config_dir: Path, out_dir: Path) -> Path:
    config = json.loads((config_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out_dir / "config.json")
    tokenizer, specials = build_tokenizer(config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = config.get("bos_token_id")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.get(bos), "eos_token": specials.get(eos),
        "model_max_length": config.get("max_position_embeddings", 4096),
        "clean_up_tokenization_spaces": False}, indent=1))
    return out_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path, help="a directory holding config.json")
    parser.add_argument("out_dir", type=Path, help="written: config.json and the tokenizer")
    args = parser.parse_args()
    out = write_model_dir(args.config_dir, args.out_dir)
    print(f"wrote {out} (config of {args.config_dir.name}, synthetic tokenizer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
