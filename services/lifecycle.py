"""How every pagewire service process runs: log setup, start, serve until SIGINT/SIGTERM,
then stop gracefully (in-flight calls finish within the service's grace period)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

S = TypeVar("S")
logger = logging.getLogger(__name__)


def run_service(start: Callable[[], Awaitable[S]], stop: Callable[[S], Awaitable[object]]) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_until_signalled(start, stop))
    return 0


async def _until_signalled(start, stop) -> None:
    server = await start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    logger.info("stopping: finishing in-flight calls")
    await stop(server)
