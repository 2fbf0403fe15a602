"""`pagewire up` end to end: real processes, a private Redis, the official openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from pagewire import SamplingParams
from pagewire.launcher import free_port


def test_up_serves_the_openai_api_and_stops_everything(llm):
    openai = pytest.importorskip("openai")
    port = free_port()
    # Port 1 has no Redis: `up` must start its own redis-server (installed on this machine).
    process = subprocess.Popen(
        [sys.executable, "-m", "pagewire.cli", "up", "--port", str(port),
         "--redis-url", "redis://127.0.0.1:1/0", "--kv-cache-bytes", str(400 << 20)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if "serving on http://" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "".join(lines[-30:])
        assert any("private redis-server" in line for line in lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                               messages=messages, max_tokens=16,
                                               temperature=0)
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))
        assert reply.choices[0].message.content == expected[0].outputs[0].text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        code = process.wait(timeout=30)
    assert code == 0
    time.sleep(0.5)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
