"""`pagewire up` end to end: real processes, a private Redis, the official openai client.

`up` starts in the repository root, as a newcomer runs it: the root holds a `kernels/` folder
that must never shadow Hugging Face's `kernels` package, which transformers imports (issue 13).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pagewire.import_roots import pagewire_argv
from pagewire.launcher import free_port
from tests.integration.up_process import UpProcess

ROOT = Path(__file__).resolve().parents[2]


def test_up_serves_the_openai_api_and_stops_everything(llm, tmp_path):
    pytest.importorskip("openai")
    # Port 1 has no Redis: `up` must start its own redis-server (installed on this machine).
    up = UpProcess("--redis-url", "redis://127.0.0.1:1/0", "--kv-cache-bytes", str(400 << 20))
    try:
        up.wait_ready()
        assert any("private redis-server" in line for line in up.lines)
        up.assert_answers_as(llm, [{"role": "user",
                                    "content": "What is the capital of France?"}], 16)
        _bench_smoke(up.base_url, tmp_path)
    finally:
        code = up.stop()
    assert code == 0
    time.sleep(0.5)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{up.port}/health", timeout=1)


def _bench_smoke(base_url: str, result_dir) -> None:
    """Issue 5's CI smoke test: `pagewire bench serve` against `pagewire up`, tiny scale."""
    from pagewire.cli import main

    assert main(["bench", "serve", "--base-url", base_url, "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "4", "--request-rate", "inf",
                 "--disable-tqdm", "--label", "up", "--result-dir", str(result_dir)]) == 0
    metrics = json.loads((result_dir / "up-rate-inf.json").read_text())["metrics"]
    assert metrics["completed"] == 4 and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == 16 and metrics["median_ttft_ms"] > 0


def _services_of(launcher_pid: int) -> list[str]:
    """PIDs of the service processes one `pagewire up` started (its Redis namespace)."""
    found = subprocess.run(["pgrep", "-f", f"pagewire-up-{launcher_pid}"], capture_output=True,
                           text=True)
    return found.stdout.split()


@pytest.mark.parametrize("how", ["SIGINT while ignored at start", "SIGKILL"])
def test_no_service_outlives_the_launcher(how):
    """A shell that starts `up` in the background leaves SIGINT ignored; a supervisor may
    SIGKILL it. Either way every service it started must go, not linger as an orphan."""
    port = free_port()
    process = subprocess.Popen(
        pagewire_argv("up", "--port", str(port), "--kv-cache-bytes", str(400 << 20)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    ready = threading.Event()

    def read():
        for line in process.stdout:
            if "serving on http://" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "pagewire up did not come up"
        assert len(_services_of(process.pid)) >= 3  # two workers and the router
        os.kill(process.pid, signal.SIGINT if how.startswith("SIGINT") else signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _services_of(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _services_of(process.pid) == []
    finally:
        if process.poll() is None:
            process.kill()
        for pid in _services_of(process.pid):
            os.kill(int(pid), signal.SIGKILL)
