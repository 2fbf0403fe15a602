"""The CLI parses what the README and compose files will pass it."""

from __future__ import annotations

import pytest

from pagewire.cli import SERVICES, build_parser


def test_serve_passes_service_flags_through():
    args = build_parser().parse_args(["serve", "tokenizer", "--port", "50061"])
    assert args.role == "tokenizer" and args.service_args == ["--port", "50061"]
    assert {"tokenizer", "prefill", "decode"} <= set(SERVICES)


def test_serve_rejects_unknown_roles():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "nonsense"])


def test_generate_flags():
    args = build_parser().parse_args(["generate", "hi", "--max-tokens", "3", "--chat"])
    assert args.prompt == ["hi"] and args.max_tokens == 3 and args.chat


def test_up_pins_each_worker_to_a_gpu_and_passes_benchmark_flags():
    from pagewire import launcher

    args = launcher.build_parser().parse_args(
        ["--prefill", "1", "--decode", "1", "--worker-gpus", "0,1", "--load-format", "dummy",
         "--kv-cache-bytes", "0"])
    # 0: the worker's default
    assert launcher._worker_flags(args, "decode") == ["--load-format", "dummy"]
    gpus = [launcher._worker_env(args, index)["CUDA_VISIBLE_DEVICES"] for index in range(3)]
    assert gpus == ["0", "1", "0"]
    assert launcher._worker_env(launcher.build_parser().parse_args([]), 0) is None
    tp = launcher.build_parser().parse_args(["--worker-gpus", "0,1,2,3",
                                             "--tensor-parallel-size", "2"])
    assert [launcher._worker_env(tp, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == \
        ["0,1", "2,3"]
    both = launcher.build_parser().parse_args(["--worker-gpus", "0,1,2,3,4,5,6,7",
                                               "--tensor-parallel-size", "2",
                                               "--pipeline-parallel-size", "2"])
    assert launcher._worker_flags(both, "decode") == ["--tensor-parallel-size", "2",
                                                      "--pipeline-parallel-size", "2"]
    assert [launcher._worker_env(both, i)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == \
        ["0,1,2,3", "4,5,6,7"]


def test_pipeline_parallel_workers_move_kv_over_grpc(monkeypatch):
    from pagewire.services.worker.server import parse_args

    config = parse_args(["--pipeline-parallel-size", "2"])
    assert config.engine.pipeline_parallel_size == 2 and config.kv_transports == ("grpc",)
    monkeypatch.setenv("PAGEWIRE_PIPELINE_PARALLEL_SIZE", "3")
    assert parse_args([]).engine.pipeline_parallel_size == 3


def test_worker_takes_dummy_weights_from_a_flag_or_the_environment(monkeypatch):
    from pagewire.services.worker.server import parse_args

    assert parse_args(["--load-format", "dummy"]).engine.load_format == "dummy"
    monkeypatch.setenv("PAGEWIRE_LOAD_FORMAT", "dummy")
    assert parse_args([]).engine.load_format == "dummy"
    with pytest.raises(SystemExit):
        parse_args(["--load-format", "pickle"])


def test_fp8_kv_cache_reaches_every_worker(monkeypatch):
    from pagewire import launcher
    from pagewire.services.worker.server import parse_args

    args = launcher.build_parser().parse_args(["--kv-cache-dtype", "fp8"])
    assert launcher._worker_flags(args, "prefill") == ["--kv-cache-dtype", "fp8"]
    assert parse_args(["--kv-cache-dtype", "fp8"]).engine.kv_cache_dtype == "fp8"
    monkeypatch.setenv("PAGEWIRE_KV_CACHE_DTYPE", "fp8")
    assert parse_args([]).engine.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-dtype", "int4"])


def test_speculative_config_reaches_decode_and_colocated_workers(monkeypatch):
    from pagewire import launcher
    from pagewire.services.worker.server import parse_args

    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    args = launcher.build_parser().parse_args(["--speculative-config", spec])
    assert launcher._worker_flags(args, "decode") == ["--speculative-config", spec]
    assert launcher._worker_flags(args, "both") == ["--speculative-config", spec]
    assert launcher._worker_flags(args, "prefill") == []  # one token: nothing to speculate
    assert parse_args(["--speculative-config", spec]).engine.speculative_config.\
        num_speculative_tokens == 3
    monkeypatch.setenv("PAGEWIRE_SPECULATIVE_CONFIG", spec)
    assert parse_args([]).engine.speculative_config.method == "ngram"
    with pytest.raises(ValueError, match="speculative method"):
        parse_args(["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'])


def test_quantization_reaches_every_worker(monkeypatch):
    from pagewire import launcher
    from pagewire.services.worker.server import parse_args

    args = launcher.build_parser().parse_args(["--quantization", "fp8"])
    assert launcher._worker_flags(args, "prefill") == ["--quantization", "fp8"]
    assert parse_args(["--quantization", "fp8"]).engine.quantization == "fp8"
    monkeypatch.setenv("PAGEWIRE_QUANTIZATION", "fp8")
    assert parse_args([]).engine.quantization == "fp8"
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int3"])


def test_free_ports_come_from_below_the_kernels_ephemeral_range():
    """bind(0) in any process (a NIXL worker's UCX listeners) can be handed a port the kernel
    just handed us; ports below the ephemeral range it never hands out."""
    from pagewire import launcher

    low = launcher._ephemeral_low()
    ports = {launcher.free_port() for _ in range(20)}
    if low > 11000:
        assert all(10000 <= p < low for p in ports)
    assert len(ports) > 1


def test_a_free_port_is_not_handed_out_twice(monkeypatch):
    """Ports picked before any is bound (a cluster's services) must differ, even when the
    random pick repeats."""
    from pagewire import launcher

    picks = iter([12345, 12345, 12345, 23456])
    monkeypatch.setattr(launcher.random, "randrange", lambda low, high: next(picks))
    monkeypatch.setattr(launcher, "_ephemeral_low", lambda: 32768)
    monkeypatch.setattr(launcher, "_HANDED_OUT", launcher.deque(maxlen=4096))
    assert [launcher.free_port(), launcher.free_port()] == [12345, 23456]
