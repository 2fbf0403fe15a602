"""How a service process ends: on a signal it exits 0; when it says it can no longer serve
(its `fatal` future resolves, e.g. a worker's engine thread died) it stops and exits 1."""

from __future__ import annotations

import asyncio
import os
import signal

from pagewire.services.lifecycle import _until_signalled


class FakeServer:
    def __init__(self, fatal=None):
        self.fatal = fatal
        self.stopped = False


def _run(server_factory) -> tuple[int, FakeServer]:
    holder = {}

    async def start():
        holder["server"] = server_factory()
        return holder["server"]

    async def stop(server):
        server.stopped = True

    code = asyncio.run(_until_signalled(start, stop))
    return code, holder["server"]


def test_a_service_that_cannot_serve_stops_with_exit_code_1():
    def server_with_failing_engine():
        fatal = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, fatal.set_result, "engine thread failed")
        return FakeServer(fatal)

    code, server = _run(server_with_failing_engine)
    assert code == 1 and server.stopped


def test_a_signalled_service_stops_with_exit_code_0():
    def server_then_sigterm():
        fatal = asyncio.get_running_loop().create_future()  # never resolves
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return FakeServer(fatal)

    code, server = _run(server_then_sigterm)
    assert code == 0 and server.stopped
