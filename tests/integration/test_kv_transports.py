"""The KV transports between a prefill and a decode worker on loopback: each gives the offline
engine's tokens; the handshake takes shared memory only when both workers see one folder, and
refuses another layout; a direct write is refused before a byte lands unless it names this
worker's cache and the reserved blocks; a reservation whose writer may still be writing is
freed only once the writer's stream has ended; nothing is left in the shared-memory folder."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import grpc
import pytest

from pagewire import SamplingParams
from pagewire.kv_transport.nixl_agent import nixl_available
from pagewire.v1 import common_pb2, worker_pb2
from tests.integration.worker_pair import (
    ENGINE,
    all_free,
    disaggregated,
    prefill_request,
    push_kv,
    run_pair,
)

PROMPT = "Write a short poem about the ocean at night, with stars and a lighthouse."
GREEDY = common_pb2.SamplingOptions(temperature=0, max_tokens=8, ignore_eos=True)
TRANSPORTS = ["shm", "grpc", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="nixl is not installed"))]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_gives_the_offline_engines_tokens(llm, tmp_path, transport):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    expected = llm.generate({"prompt_token_ids": prompt_ids},
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    config = {"kv_transports": (transport,), "shm_dir": str(tmp_path)}

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        first = await disaggregated(prefill, decode, decode_addr, "r1", prompt_ids, GREEDY)
        again = await disaggregated(prefill, decode, decode_addr, "r2", prompt_ids, GREEDY)
        stats = [await w.GetStats(worker_pb2.StatsRequest()) for w in (prefill, decode)]
        return first, again, stats

    (prefilled, batches), (again, batches_again), stats = run_pair(scenario, config, config)
    tokens = [t for b in batches for t in b.token_ids]
    assert tokens == [t for b in batches_again for t in b.token_ids]
    assert tokens == list(expected[0].outputs[0].token_ids)
    assert prefilled.kv_transport == transport and prefilled.kv_bytes > 0
    assert prefilled.kv_transfer_us > 0 and prefilled.prefill_us > 0
    assert prefilled.computed_tokens == len(prompt_ids)
    assert again.kv_bytes < prefilled.kv_bytes  # the decode worker's cached prefix is skipped
    assert all(all_free(s) for s in stats)
    assert [p.name for p in tmp_path.iterdir()] == []  # cache file and probes removed


def test_workers_that_see_different_folders_do_not_use_shared_memory(llm, tmp_path):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        return await disaggregated(prefill, decode, decode_addr, "r1", prompt_ids, GREEDY)

    prefilled, batches = run_pair(scenario, {"shm_dir": str(tmp_path / "a")},
                                  {"shm_dir": str(tmp_path / "b")})
    assert prefilled.kv_transport == ("nixl" if nixl_available() else "grpc")
    assert sum(len(b.token_ids) for b in batches) == 8


def test_a_folder_without_room_for_the_cache_sends_grpc_bytes(llm, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # tmpfs at its size limit
    prompt_ids = llm.get_tokenizer().encode(PROMPT)

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        return await disaggregated(prefill, decode, decode_addr, "r1", prompt_ids, GREEDY)

    config = {"shm_dir": str(tmp_path), "kv_transports": ("shm",)}
    prefilled, batches = run_pair(scenario, config, config)
    assert prefilled.kv_transport == "grpc" and sum(len(b.token_ids) for b in batches) == 8
    assert [p.name for p in tmp_path.iterdir()] == []


def direct_header(prompt_ids, rid, reserved, **fields) -> worker_pb2.KVChunk:
    header = worker_pb2.KVHeader(
        request_id=rid, model="SmolLM2-135M-Instruct", dtype="float32", block_size=16,
        num_layers=30, num_kv_heads=3, head_dim=64, num_tokens=len(prompt_ids),
        num_blocks=reserved.num_blocks, transport="shm", block_ids=reserved.block_ids,
        cache_id=reserved.cache_id, first_token_id=5)
    for name, value in fields.items():
        if name == "block_ids":
            header.block_ids[:] = value
        else:
            setattr(header, name, value)
    return worker_pb2.KVChunk(header=header)


def test_direct_writes_are_checked_before_a_byte_lands(llm, tmp_path):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    config = {"shm_dir": str(tmp_path), "kv_transports": ("shm",)}
    commit = worker_pb2.KVChunk(commit=worker_pb2.KVCommit())
    blocks = worker_pb2.KVChunk(blocks=worker_pb2.KVBlocks(data=b"\0" * 16))

    async def refused(decode, rid, chunks_of):
        stream = decode.Decode(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt_ids, sampling=GREEDY,
            transfer_timeout_ms=30000))
        reserved = (await stream.read()).reserved
        with pytest.raises(grpc.aio.AioRpcError) as push_error:
            await push_kv(decode, chunks_of(reserved))
        with pytest.raises(grpc.aio.AioRpcError) as decode_error:
            await stream.read()
        return push_error.value, decode_error.value.code()

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await decode.KVHandshake(worker_pb2.KVHandshakeRequest(
                model="SmolLM2-135M-Instruct", dtype="float32", block_size=32, num_layers=30,
                num_kv_heads=3, head_dim=64, transports=["shm", "grpc"]))
        cases = {  # name -> the chunks pushed into reservation "r-{name}"
            "another cache": lambda rid, r: [direct_header(prompt_ids, rid, r,
                                                           cache_id="0" * 16)],
            "other blocks": lambda rid, r: [direct_header(
                prompt_ids, rid, r, block_ids=[b + 1 for b in r.block_ids])],
            "not offered": lambda rid, r: [direct_header(prompt_ids, rid, r,
                                                         transport="cuda_ipc")],
            "bytes in a direct write": lambda rid, r: [direct_header(prompt_ids, rid, r),
                                                       blocks],
            "a commit of gRPC bytes": lambda rid, r: [direct_header(prompt_ids, rid, r,
                                                                    transport="grpc"), commit],
        }
        results = {name: await refused(decode, f"r-{name}",
                                       lambda r, name=name, f=f: f(f"r-{name}", r))
                   for name, f in cases.items()}
        return mismatch.value, results, await decode.GetStats(worker_pb2.StatsRequest())

    mismatch, results, stats = run_pair(scenario, config, config)
    assert mismatch.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "block_size" in mismatch.details()
    fragments = {"another cache": "shake hands again", "other blocks": "other blocks",
                 "not offered": "does not offer", "bytes in a direct write": "blocks message",
                 "a commit of gRPC bytes": "commit message"}
    for name, (push_error, decode_code) in results.items():
        assert push_error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, push_error)
        assert fragments[name] in push_error.details(), (name, push_error.details())
        assert decode_code == grpc.StatusCode.INVALID_ARGUMENT, name
    assert all_free(stats)


def test_a_reservation_is_freed_only_once_its_writer_is_done(llm, tmp_path):
    """The decode worker's transfer timeout ends a reservation whose writer accepted its header
    and has not committed: its blocks must stay out of the free pool until the writer's stream
    ends, or a late write would land in another request's blocks."""
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    config = {"shm_dir": str(tmp_path), "kv_transports": ("shm",)}

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        idle = await decode.GetStats(worker_pb2.StatsRequest())
        stream = decode.Decode(worker_pb2.DecodeRequest(
            request_id="slow", prompt_token_ids=prompt_ids, sampling=GREEDY,
            transfer_timeout_ms=300))
        reserved = (await stream.read()).reserved
        writer = decode.PushKV()
        await writer.write(direct_header(prompt_ids, "slow", reserved))
        assert (await writer.read()).ready  # accepted: the writer may write from now on
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await stream.read()
        await asyncio.sleep(0.5)
        while_writing = await decode.GetStats(worker_pb2.StatsRequest())
        writer.cancel()  # the writer is gone: nothing can land any more
        await asyncio.sleep(0.5)
        return idle, reserved, timed_out.value.code(), while_writing, \
            await decode.GetStats(worker_pb2.StatsRequest())

    idle, reserved, code, while_writing, after = run_pair(scenario, config, config)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert reserved.num_blocks > 0  # still held for the writer:
    assert while_writing.kv_blocks_free == idle.kv_blocks_free - reserved.num_blocks
    assert all_free(after)


def test_a_sender_that_dies_before_its_commit_leaves_the_reservation_to_a_retry(llm, tmp_path):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    expected = llm.generate({"prompt_token_ids": prompt_ids},
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    config = {"shm_dir": str(tmp_path), "kv_transports": ("shm",)}

    async def scenario(prefill, decode, prefill_addr, decode_addr):
        stream = decode.Decode(worker_pb2.DecodeRequest(
            request_id="retried", prompt_token_ids=prompt_ids, sampling=GREEDY,
            transfer_timeout_ms=30000))
        reserved = (await stream.read()).reserved
        with pytest.raises(grpc.aio.AioRpcError):  # the header alone, then the stream ends
            await push_kv(decode, [direct_header(prompt_ids, "retried", reserved)])
        await prefill.Prefill(prefill_request("retried", prompt_ids, GREEDY, decode_addr,
                                              reserved))
        tokens = []
        while (message := await stream.read()) != grpc.aio.EOF:
            tokens += message.tokens.token_ids
        return tokens, await decode.GetStats(worker_pb2.StatsRequest())

    tokens, stats = run_pair(scenario, config, config)
    assert tokens == list(expected[0].outputs[0].token_ids)
    assert all_free(stats)


@pytest.mark.parametrize("transport", [t for t in TRANSPORTS if t != "grpc"])
def test_a_prompt_prefilled_in_chunks_streams_its_blocks_and_decodes_the_same(llm, tmp_path,
                                                                             transport):
    """32-token steps: a 100-token prompt takes four chunks, and the direct transports send
    each chunk's full blocks as it completes. The decode worker's tokens equal those of the
    same chunked prefill sent as gRPC bytes after the fact."""
    prompt_ids = llm.get_tokenizer().encode(PROMPT * 6)[:100]
    engine = dataclasses.replace(ENGINE, max_num_batched_tokens=32)

    def tokens(transport: str):
        config = {"kv_transports": (transport,), "shm_dir": str(tmp_path)}

        async def scenario(prefill, decode, prefill_addr, decode_addr):
            return await disaggregated(prefill, decode, decode_addr, "r", prompt_ids, GREEDY)

        prefilled, batches = run_pair(scenario, config, config, engine=engine)
        assert prefilled.kv_transport == transport
        return [t for b in batches for t in b.token_ids]

    streamed = tokens(transport)
    assert streamed == tokens("grpc") and len(streamed) == 8
