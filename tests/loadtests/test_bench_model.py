"""loadtests/bench_model.py: a config plus a synthetic tokenizer that serves dummy weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoTokenizer

from pagewire.model.model_source import resolve_model
from pagewire.tokenizer.loader import eos_token_ids

SCRIPT = Path(__file__).resolve().parents[2] / "loadtests" / "bench_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_id_of_the_config_vocabulary_decodes_and_eos_is_special(tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 1000, "bos_token_id": 1, "eos_token_id": [2, 999]}))
    out = load_script().write_model_dir(config_dir, tmp_path / "served")
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tokenizer) == 1000
    words = tokenizer.decode(list(range(256, 1000)), skip_special_tokens=True).split(" ")
    assert len(set(words[1:])) == 1000 - 256 - 1  # one distinct word per id; 999 is EOS
    assert tokenizer.decode([104, 105]) == "hi"  # ids below 256 are bytes
    source = resolve_model(str(out))
    assert source.tokenizer_dir == str(out)
    assert eos_token_ids(source, tokenizer) == {2, 999}
