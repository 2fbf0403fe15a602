"""The tokenizer service as `python -m`: it starts from flags and stops cleanly on SIGTERM."""

import os
import re
import signal
import subprocess
import sys
import time

import grpc

from pagewire.v1 import tokenizer_pb2 as pb
from pagewire.v1 import tokenizer_pb2_grpc


def test_module_serves_and_stops_on_sigterm():
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "pagewire.services.tokenizer.server", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "the server exited before serving"
            match = re.search(r"serving on [\d.]+:(\d+)", line)
            port = int(match.group(1)) if match else None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            assert stub.Tokenize(pb.TokenizeRequest(text="hi"), timeout=5).token_ids
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
