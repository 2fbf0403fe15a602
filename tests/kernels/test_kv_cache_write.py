"""Writing new K/V rows into the paged cache by slot mapping."""

from __future__ import annotations

import torch

from tests.kernels.helpers import DEVICE, require_triton, undo_interpreter_carry_bug

require_triton()

from pagewire.kernels.kv_cache_write import (  # noqa: E402
    write_kv_cache,
    write_kv_cache_reference,
)
from pagewire.model.attention import write_kv_cache as engine_write  # noqa: E402


def _inputs(seed, num_tokens, kv_heads, head_dim, block_size, num_blocks, dtype):
    gen = torch.Generator().manual_seed(seed)
    # k and v as the engine has them: strided views of the fused qkv projection's output.
    qkv = torch.randn(num_tokens, (4 + 2) * kv_heads * head_dim, generator=gen).to(dtype)
    _, k, v = qkv.split([4 * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    k, v = k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    return k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), cache.to(DEVICE)


def test_matches_the_engines_index_copy():
    k, v, slots, cache = _inputs(0, 37, 3, 32, 16, 8, torch.float32)
    ours, theirs = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots)
    engine_write(theirs, k, v, slots)
    assert torch.equal(ours, theirs)


def test_int32_slots_and_float16():
    k, v, slots, cache = _inputs(1, 20, 2, 16, 4, 16, torch.float16)
    ours, ref = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots.to(torch.int32))
    write_kv_cache_reference(ref, k, v, slots)
    assert torch.equal(ours, ref)


def test_negative_slots_are_skipped():
    k, v, slots, cache = _inputs(2, 12, 2, 16, 8, 4, torch.float32)
    slots[::3] = -1
    ours, ref = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots)
    write_kv_cache_reference(ref, k, v, slots)
    assert torch.equal(ours, ref)


def test_one_layer_slice_of_the_whole_cache():
    """The engine hands each layer a view of [layers, 2, ...]; other layers stay untouched."""
    k, v, slots, _ = _inputs(3, 9, 2, 16, 4, 8, torch.float32)
    whole = torch.randn(3, 2, 8, 4, 2, 16).to(DEVICE)
    before = whole.clone()
    write_kv_cache(whole[1], k, v, slots)
    write_kv_cache_reference(before[1], k, v, slots)
    assert torch.equal(whole, before)


def test_fp8_cache_saturates_and_matches_the_torch_path():
    """An fp8 cache stores each value rounded to e4m3 and clipped to +-448, as the torch path
    does; the big values here would be NaN if the cast did not saturate."""
    k, v, slots, cache = _inputs(4, 24, 2, 16, 4, 8, torch.float32)
    k, v = k * 300, v * 300  # some beyond 448
    assert k.abs().max() > 448
    cache = cache.to(torch.float8_e4m3fn)
    ours, theirs = cache.clone(), cache.clone()
    write_kv_cache(ours, k, v, slots)
    engine_write(theirs, k, v, slots)
    ours, theirs = ours.float(), theirs.float()
    if DEVICE == "cpu":
        ours = undo_interpreter_carry_bug(ours, theirs)
    assert torch.equal(ours, theirs)
    written = ours.flatten(1, 2)[0, slots.long()]
    assert torch.isfinite(written).all() and written.abs().max() == 448
    assert torch.equal(written, k.clamp(-448, 448).to(torch.float8_e4m3fn).float())
