"""Loads a model's tokenizer (from its own directory, never a hub) and its end-of-sequence ids."""

from __future__ import annotations

import json
import os

from transformers import AutoTokenizer

from pagewire.model.model_source import ModelSource


def load_tokenizer(source: ModelSource):
    return AutoTokenizer.from_pretrained(source.tokenizer_dir, local_files_only=True)


def eos_token_ids(source: ModelSource, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, merged: chat models
    often end turns with a token (<|im_end|>, <|eot_id|>) that only one of them names."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(source.model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
