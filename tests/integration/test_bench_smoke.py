"""`pagewire bench serve` and `sweep` against the real pipeline (in-process, embedded model),
at a tiny scale: every request completes, the metrics are sane, the files and plots exist."""

from __future__ import annotations

import json

import pytest

from pagewire.bench.plots import plots_available
from pagewire.cli import main
from tests.integration.stack import Stack

TINY = ["--num-prompts", "6", "--input-len", "8", "--output-len", "4", "--disable-tqdm"]


@pytest.fixture(scope="module")
def base_url():
    stack = Stack(roles=("both",))
    yield f"http://127.0.0.1:{stack.port}/v1"
    stack.stop()


def test_bench_serve_measures_every_request(base_url, tmp_path):
    assert main(["bench", "serve", "--base-url", base_url, *TINY, "--request-rate", "20",
                 "--goodput", "ttft:100000", "tpot:1", "--label", "smoke",
                 "--result-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "smoke-rate-20.json").read_text())
    m = result["metrics"]
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert m["completed"] == 6 and m["failed"] == 0 and m["errors"] == {}
    assert m["total_output_tokens"] == 24 and m["total_input_tokens"] == 48
    for name in ("ttft", "tpot", "e2el"):
        assert 0 < m[f"median_{name}_ms"] <= m[f"p99_{name}_ms"]
    assert m["mean_ttft_ms"] < m["mean_e2el_ms"]
    assert 0 < m["request_throughput"] and m["output_throughput"] == pytest.approx(
        4 * m["request_throughput"])
    assert 0 <= m["request_goodput"] <= m["request_throughput"]
    assert (tmp_path / "smoke-rate-20.png").exists() == plots_available()


def test_bench_sweep_draws_throughput_and_latency_against_rate(base_url, tmp_path):
    assert main(["bench", "sweep", "--base-url", base_url, *TINY, "--dataset", "multi-turn",
                 "--num-prompts", "2", "--turns", "2", "--rates", "4", "inf",
                 "--label", "smoke", "--result-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "smoke-sweep.json").read_text())
    assert [run["request_rate"] for run in summary["runs"]] == [4, "inf"]
    for run in summary["runs"]:
        assert run["metrics"]["completed"] == 4 and run["metrics"]["mean_ttft_ms"] > 0
    if plots_available():
        assert (tmp_path / "smoke-sweep.png").exists()
        assert (tmp_path / "smoke-sweep-cdf.png").exists()
