"""How every pagewire service process runs: log setup, start, serve until SIGINT/SIGTERM,
then stop gracefully (in-flight calls finish within the service's grace period); and the
standard gRPC health service every one of them answers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

S = TypeVar("S")
logger = logging.getLogger(__name__)


def run_service(start: Callable[[], Awaitable[S]], stop: Callable[[S], Awaitable[object]]) -> int:
    """Serves until signalled (exit 0) or until the service's `fatal` future, if it has one,
    says it can no longer serve (exit 1: compose restarts it, `pagewire up` stops the stack,
    and its registry entry expires instead of advertising a worker that answers nothing)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(_until_signalled(start, stop))


async def _until_signalled(start, stop) -> int:
    server = await start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    signalled = asyncio.ensure_future(stopped.wait())
    fatal = getattr(server, "fatal", None)
    await asyncio.wait([signalled] + ([fatal] if fatal is not None else []),
                       return_when=asyncio.FIRST_COMPLETED)
    if fatal is not None and fatal.done():
        logger.error("stopping: %s", fatal.result())
    else:
        logger.info("stopping: finishing in-flight calls")
    signalled.cancel()
    await stop(server)
    return 1 if fatal is not None and fatal.done() else 0


async def add_health(server: grpc.aio.Server, service_name: str) -> None:
    """Standard gRPC health checking: SERVING for the whole server ("") and `service_name`."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", service_name):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
