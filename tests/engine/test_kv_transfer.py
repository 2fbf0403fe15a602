"""KV export from one engine, import into another, and decoding continues token for token."""

from __future__ import annotations

import dataclasses

import pytest

from pagewire import SamplingParams
from pagewire.engine.kv_transfer import KVFormatError, KVLayoutMismatch
from pagewire.engine.llm_engine import InvalidRequestError, OutOfKVBlocksError
from tests.engine.helpers import make_llm

PROMPT = ("In a distant galaxy, a small robot named Pip discovered an ancient map. The map showed "
          "a path through seven nebulae to a planet made of glass, and Pip decided to")


@pytest.fixture(scope="module")
def decode_llm():
    return make_llm()


def prefill(engine, rid, prompt_ids, params):
    """The prefill role: compute the prompt, sample the first token, keep the blocks."""
    engine.add_request(rid, prompt_ids, params, hold_kv=True)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    return outputs[-1].outputs[0].token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_export_import_continues_exactly(llm, decode_llm, params):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    expected = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]

    one_token = dataclasses.replace(params, max_tokens=1)
    first = prefill(llm.engine, "xfer", prompt_ids, one_token)
    data = llm.engine.export_kv("xfer")
    llm.engine.release("xfer")
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks

    engine = decode_llm.engine
    engine.import_kv("xfer", prompt_ids, first, data, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    continued = outputs[-1].outputs[0]
    assert continued.token_ids == expected.token_ids
    assert continued.text == expected.text
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_layout_mismatch_is_a_clear_error(llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    first = prefill(llm.engine, "mismatch", prompt_ids, SamplingParams(max_tokens=1))
    data = llm.engine.export_kv("mismatch")
    llm.engine.release("mismatch")
    other = make_llm(block_size=32)
    with pytest.raises(KVLayoutMismatch, match="block_size: 32 here, 16 in the export"):
        other.engine.import_kv("mismatch", prompt_ids, first, data)
    assert other.engine.block_manager.num_free_blocks == other.engine.block_manager.num_blocks
    with pytest.raises(KVFormatError, match="payload bytes"):
        llm.engine.import_kv("cut", prompt_ids, first, data[:-100])
    with pytest.raises(KVFormatError):
        llm.engine.import_kv("garbage", prompt_ids, first, b"\x05\x00\x00\x00hello")
    assert not llm.engine.seqs


def test_import_without_room_fails_and_leaks_nothing(llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT * 2)  # ~80 tokens: 5 or 6 blocks
    first = prefill(llm.engine, "big", prompt_ids, SamplingParams(max_tokens=1))
    data = llm.engine.export_kv("big")
    llm.engine.release("big")
    engine = make_llm(kv_cache_memory_bytes=12 * 737280, max_model_len=128).engine
    engine.import_kv("a", prompt_ids, first, data)
    engine.import_kv("b", prompt_ids, first, data)
    free_before = engine.block_manager.num_free_blocks
    with pytest.raises(OutOfKVBlocksError):
        engine.import_kv("c", prompt_ids, first, data)
    assert engine.block_manager.num_free_blocks == free_before and "c" not in engine.seqs
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_reserved_prefix_blocks_are_not_sent_again(llm, decode_llm):
    """The decode side already holds a shared system prompt's blocks: the transfer skips them."""
    system = PROMPT * 2
    warm = llm.get_tokenizer().encode(system + " First question?")
    prompt_ids = llm.get_tokenizer().encode(system + " Second question, a different one?")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]
    decode_llm.generate({"prompt_token_ids": warm}, SamplingParams(max_tokens=1))

    engine = decode_llm.engine
    skip = engine.reserve_kv("shared", prompt_ids, params)
    assert skip >= 4  # the system prompt spans several full blocks
    first = prefill(llm.engine, "shared", prompt_ids, dataclasses.replace(params, max_tokens=1))
    full = llm.engine.export_kv("shared")
    partial = llm.engine.export_kv("shared", skip_blocks=skip)
    llm.engine.release("shared")
    assert len(partial) < len(full) - skip * llm.engine.kv_layout.block_bytes * 0.99
    engine.import_kv("shared", prompt_ids, first, partial, params)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[-1].outputs[0].token_ids == expected.token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_failed_or_abandoned_reservations_free_their_blocks(llm, decode_llm):
    engine = decode_llm.engine
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    first = prefill(llm.engine, "r", prompt_ids, SamplingParams(max_tokens=1))
    data = llm.engine.export_kv("r", skip_blocks=1)
    llm.engine.release("r")
    engine.reserve_kv("abandoned", prompt_ids)
    engine.reserve_kv("mismatch", prompt_ids)
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    with pytest.raises(InvalidRequestError, match="skips 1 blocks"):
        engine.import_kv("mismatch", prompt_ids, first, data)
    with pytest.raises(InvalidRequestError, match="nothing was reserved"):
        engine.import_kv("unknown", prompt_ids, first, data)
    engine.abort_request("abandoned")  # what a transfer timeout does
    engine.abort_request("mismatch")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.seqs
