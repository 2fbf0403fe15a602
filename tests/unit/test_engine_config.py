"""EngineConfig's derived defaults: step sizes by device and usage, the KV cache's type."""

from __future__ import annotations

import pytest
import torch

from pagewire.config import EngineConfig


def test_cpu_defaults_are_the_same_offline_and_serving():
    for usage in ("offline", "server"):
        config = EngineConfig(device="cpu", usage=usage)
        assert (config.seq_limit, config.token_budget) == (256, 2048)


def test_explicit_limits_win():
    config = EngineConfig(device="cpu", max_num_seqs=7, max_num_batched_tokens=99)
    assert (config.seq_limit, config.token_budget) == (7, 99)


def test_kv_cache_dtype_defaults_to_the_models():
    assert EngineConfig(device="cpu").kv_torch_dtype == torch.float32
    assert EngineConfig(device="cpu", kv_cache_dtype="fp8").kv_torch_dtype == \
        torch.float8_e4m3fn


@pytest.mark.parametrize("field, value", [("usage", "batch"), ("kv_cache_dtype", "fp4"),
                                          ("max_num_seqs", 0)])
def test_bad_values_fail_at_construction(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(device="cpu", **{field: value})

