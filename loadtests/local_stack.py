"""`pagewire up` as a subprocess, for the load tests that drive a whole local deployment.

Scripts beside this file import it as `local_stack` (run them as `python loadtests/NAME.py`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence

# `pagewire up` flags per configuration
CONFIGS = {
    "disagg": ["--prefill", "1", "--decode", "1"],
    "colocated": ["--prefill", "0", "--decode", "0", "--colocated", "1"],
    # As many workers as disagg, each doing both (issue 5's fair comparison on two GPUs).
    "colocated-2": ["--prefill", "0", "--decode", "0", "--colocated", "2"],
    # Two prefill workers behind each routing policy (issue 5: prefix-aware vs round-robin).
    "prefix-routing": ["--prefill", "2", "--decode", "1", "--routing", "prefix"],
    "round-robin": ["--prefill", "2", "--decode", "1", "--routing", "round-robin"],
}
READY_TIMEOUT_S = 300.0


# ---- the stack under test --------------------------------------------------------------------

class PipelineProcess:
    """`pagewire up` in its own process group; `url` once it says it serves."""

    def __init__(self, config: str, kv_cache_bytes: int | None, model: str | None,
                 verbose: bool, up_flags: Sequence[str] = ()):
        """kv_cache_bytes None: the workers' default; up_flags: more `pagewire up` flags."""
        from pagewire.import_roots import pagewire_argv
        from pagewire.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = pagewire_argv("up", "--port", str(self.port), *CONFIGS[config], *up_flags)
        if kv_cache_bytes:
            argv += ["--kv-cache-bytes", str(kv_cache_bytes)]
        if model:
            argv += ["--model", model]
        self.command = " ".join(["pagewire", *argv[4:]])
        self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True)
        self._log: deque[str] = deque(maxlen=40)
        self._ready = threading.Event()
        self._verbose = verbose
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._process.stdout:
            self._log.append(line)
            if self._verbose:
                print(f"  [up] {line}", end="", flush=True)
            if "serving on http://" in line:
                self._ready.set()

    @property
    def pid(self) -> int:
        """The launcher's: every service of the stack runs below it."""
        return self._process.pid

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.5):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`{self.command}` did not come up:\n" + "".join(self._log))

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGINT)  # what Ctrl-C sends: `up` stops all
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
