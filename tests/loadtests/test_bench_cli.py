"""`pagewire bench serve|sweep` end to end against the faked server: files, plots, compare."""

from __future__ import annotations

import json

import pytest

from pagewire.bench import serve
from pagewire.bench.plots import plots_available
from pagewire.cli import main
from tests.loadtests.fake_server import MODEL, FakeServer

SMALL = ["--base-url", "http://fake/v1", "--num-prompts", "5", "--input-len", "6",
         "--output-len", "4", "--disable-tqdm"]


@pytest.fixture
def server(monkeypatch):
    fake = FakeServer(token_gap_s=0.001)
    monkeypatch.setattr(serve, "new_client", lambda *args, **kwargs: fake.client())
    return fake


def test_serve_writes_every_metric_and_the_cdf_plot(server, tmp_path, capsys):
    code = main(["bench", "serve", *SMALL, "--label", "fake", "--request-rate", "50",
                 "--goodput", "ttft:1000", "tpot:1000", "--result-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "fake-rate-50.json").read_text())
    m = result["metrics"]
    assert result["model"] == MODEL and result["request_rate"] == 50
    assert m["completed"] == 5 and m["failed"] == 0 and m["total_output_tokens"] == 20
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert m[f"{stat}_{name}_ms"] > 0
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert len(result["requests"]) == 5 and "api_key" not in result["config"]
    assert len(server.bodies) == 6  # one warm-up request first
    assert "TTFT" in capsys.readouterr().out
    assert (tmp_path / "fake-rate-50.png").exists() == plots_available()


def test_serve_fails_fast_when_the_server_refuses(monkeypatch, tmp_path, capsys):
    fake = FakeServer(fail_with=400)
    monkeypatch.setattr(serve, "new_client", lambda *args, **kwargs: fake.client())
    assert main(["bench", "serve", *SMALL, "--result-dir", str(tmp_path)]) == 1
    assert "warm-up request failed: HTTP 400" in capsys.readouterr().err
    assert len(fake.bodies) == 1


def test_sweep_writes_a_result_per_rate_a_summary_and_compares(server, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for label, directory in (("first", first), ("second", second)):
        assert main(["bench", "sweep", *SMALL, "--dataset", "shared-prefix", "--num-prefixes",
                     "2", "--prefix-len", "8", "--rates", "20", "inf", "--label", label,
                     "--result-dir", str(directory)]) == 0
    summary = json.loads((first / "first-sweep.json").read_text())
    assert [run["request_rate"] for run in summary["runs"]] == [20, "inf"]
    assert (first / "first-rate-20.json").exists() and (first / "first-rate-inf.json").exists()
    assert main(["bench", "sweep", "--compare", str(first), str(second / "second-sweep.json"),
                 "--label", "both", "--result-dir", str(tmp_path)]) == 0
    if plots_available():
        assert (first / "first-sweep.png").exists() and (first / "first-sweep-cdf.png").exists()
        assert (tmp_path / "both-sweep.png").stat().st_size > 10_000


def test_sweep_over_concurrency_writes_a_point_per_cap(server, tmp_path):
    assert main(["bench", "sweep", *SMALL, "--concurrencies", "1", "4", "--label", "conc",
                 "--goodput", "ttft:1000", "--result-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "conc-sweep.json").read_text())
    assert summary["x"] == "max_concurrency"
    assert [(r["request_rate"], r["max_concurrency"]) for r in summary["runs"]] == \
        [("inf", 1), ("inf", 4)]
    assert (tmp_path / "conc-rate-inf-concurrency-4.json").exists()
    assert len(server.bodies) == 2 * (1 + 5)  # a warm-up and 5 requests per point
    if plots_available():
        assert (tmp_path / "conc-sweep.png").exists()


def test_sweep_takes_rates_or_concurrencies_not_both(server, tmp_path, capsys):
    assert main(["bench", "sweep", *SMALL, "--rates", "2", "--concurrencies", "1",
                 "--result-dir", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_sweep_needs_rates_or_results(tmp_path, capsys):
    assert main(["bench", "sweep", "--result-dir", str(tmp_path)]) == 2
    assert "--rates" in capsys.readouterr().err
