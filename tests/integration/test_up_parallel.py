"""`pagewire up --tensor-parallel-size 2` and `--pipeline-parallel-size 2`: a prefill and a
decode worker of two ranks each; the prompt's KV leaves the prefill group whole (every head and
layer, gathered from its ranks) and enters the decode group (each rank keeping its heads or its
layers) over gRPC, and the answers are the single-process engine's greedy ones."""

from __future__ import annotations

import pytest

from tests.integration.up_process import UpProcess


@pytest.mark.parametrize("flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_up_with_two_rank_workers_answers_as_one_process(llm, flag):
    pytest.importorskip("openai")
    up = UpProcess(flag, "2", "--kv-cache-bytes", str(32 << 20), "--max-model-len", "1024")
    try:
        up.wait_ready()
        up.assert_answers_as(llm, [{"role": "user",
                                    "content": "Name three colours of the rainbow."}], 24)
    finally:
        assert up.stop() == 0
