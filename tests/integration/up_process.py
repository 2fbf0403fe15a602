"""`pagewire up` as a real process started from the repository root, as a newcomer runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from pagewire.import_roots import pagewire_argv
from pagewire.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
READY_S = 240


class UpProcess:
    """`pagewire up FLAGS` on a free port; `lines` is what it printed so far."""

    def __init__(self, *flags: str):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            pagewire_argv("up", "--port", str(self.port), *flags), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=ROOT)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "serving on http://" in line:
                self._ready.set()

    def wait_ready(self) -> None:
        """Until it serves; fails at once, with its output, if it exits first."""
        for _ in range(READY_S):
            if self._ready.wait(1) or self.process.poll() is not None:
                break
        assert self._ready.is_set(), "".join(self.lines[-30:])

    def assert_answers_as(self, llm, messages: list[dict], max_tokens: int) -> None:
        """A greedy chat through the official client gets the offline engine's answer."""
        import openai

        from pagewire import SamplingParams

        client = openai.OpenAI(base_url=self.base_url, api_key="unused")
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                               max_tokens=max_tokens, temperature=0)
        expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))
        assert reply.choices[0].message.content == expected[0].outputs[0].text

    def stop(self) -> int:
        """Ctrl-C, as a terminal sends it; its exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=30)
