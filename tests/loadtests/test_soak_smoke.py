"""`loadtests/soak.py` end to end at a tiny scale: it starts `pagewire up` (1 prefill + 1 decode
worker), measures capacity, soaks for 15 s at a small load with streamed, non-streamed and
disconnected requests, and the soak passes on the healthy stack (about 40 s). Under CI load a
window can hold too few requests for its latency check, which is then skipped, not failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagewire.bench.plots import plots_available

SCRIPT = Path(__file__).resolve().parents[2] / "loadtests" / "soak.py"
TINY = ["--duration-s", "15", "--capacity-s", "6", "--capacity-concurrency", "4",
        "--load-fraction", "0.4", "--input-len", "32", "--output-len", "8", "--prefix-len",
        "64", "--disconnect-fraction", "0.1", "--non-stream-fraction", "0.2",
        "--kv-cache-bytes", str(128 << 20), "--max-model-len", "2048",
        "--sample-interval-s", "1", "--progress-every-s", "5",
        # A 5 s window holds ~10 requests: on a loaded 2-core CI machine one slow request moves
        # its p90 (seen: TTFT 327 -> 840 ms, x2.57). The ratio check itself is tested on fixed
        # data (test_soak_checks.py); here it only must not fail on that noise.
        "--max-p90-ratio", "4"]


@pytest.mark.slow
def test_a_short_soak_of_a_healthy_stack_passes_every_check(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--result-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "soak passed" in done.stdout
    record = json.loads((tmp_path / "soak-disagg.json").read_text())
    checks = {check["name"]: check for check in record["checks"]}
    not_passed = {name: (c["ok"], c["detail"]) for name, c in checks.items() if not c["ok"]}
    # The outcome checks must pass; "soak passed" above already means no check failed. A 15 s
    # window on a loaded 2-core CI machine may hold too few requests to judge latency (seen
    # once: skipped); test_soak_checks.py tests those checks on fixed data.
    core = ("every request has an outcome", "few failures", "every process alive",
            "no KV block leaked")
    assert all(checks[name]["ok"] for name in core), not_passed
    assert any(name.endswith("p90 stable") for name in checks) and "memory flat" in checks
    counts = record["counts"]
    assert counts["lost"] == 0 and counts["completed"] > 20
    modes = {r["mode"] for r in record["requests"] if r["status"] == "completed"}
    assert modes == {"stream", "non-stream"}
    # Poisson arrivals at a rate set by the capacity this machine measured (2 req/s under CI
    # load once, so 12.5 expected and 10 sent): half the expected count is a sender that works.
    expected = record["rate_rps"] * record["windows"]["duration_s"]
    assert record["capacity"]["capacity_rps"] > 0 and record["soak_sent"] >= max(3, expected / 2)
    assert {"prefill worker", "decode worker", "router", "gateway", "tokenizer"} <= set(
        record["memory"])
    assert all(w["kv_blocks_free"] == w["kv_blocks_total"] for w in record["final_workers"])
    assert (tmp_path / "soak-disagg.png").exists() == plots_available()
