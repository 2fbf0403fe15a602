"""The worker service's configuration: one frozen dataclass, from flags or environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from pagewire.config import EngineConfig
from pagewire.kv_transport import KV_TRANSPORTS, check_transports

ROLES = ("prefill", "decode", "both")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class WorkerConfig:
    role: str = "both"
    """prefill | decode | both (colocated: does the whole request itself)."""
    host: str = "127.0.0.1"
    """Interface to listen on; loopback unless told otherwise."""
    port: int = 50061
    """TCP port; 0 picks a free one (reported as server.bound_port)."""
    worker_id: str | None = None
    """Name in the registry; defaults to role@host:port."""
    engine: EngineConfig = EngineConfig()
    """The engine this worker runs."""
    redis_url: str | None = None
    """Registry and prefix index; None: this worker is not announced (tests, direct use)."""
    redis_namespace: str = "pagewire"
    """Key prefix in Redis, shared by the router and every worker of one deployment."""
    advertise_address: str | None = None
    """host:port others reach this worker at; defaults to host:port, or, bound to every
    interface (0.0.0.0 in a container), to this machine's address toward Redis and the port."""
    kv_chunk_bytes: int = 4 << 20
    """Largest KV message of a transfer (whole blocks; at least one block per message)."""
    max_message_bytes: int = 64 << 20
    kv_transports: tuple[str, ...] = KV_TRANSPORTS
    """KV transports this worker may use, fastest first (pagewire.kv_transport); gRPC bytes,
    the fallback, always comes last. `grpc` alone forces today's path (for comparisons)."""
    shm_dir: str = "/dev/shm"
    """tmpfs folder of the shared-memory transport; workers must see the same one."""
    test_kv_push_pause_s: float = 0.0
    """Fault injection for tests only (env PAGEWIRE_TEST_KV_PUSH_PAUSE_S): the sender waits
    this long before each KV message after the header, so a test can kill it mid-transfer.
    Always 0 in a real deployment."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {self.role!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if self.kv_chunk_bytes <= 0 or self.max_message_bytes <= self.kv_chunk_bytes:
            raise ValueError("need 0 < kv_chunk_bytes < max_message_bytes")
        transports = check_transports(self.kv_transports)
        if self.engine.parallel_size > 1:
            # The other transports read or write rank 0's cache memory in place; a parallel
            # engine's KV is spread over its ranks and moves through export/import (whole).
            transports = ("grpc",)
        object.__setattr__(self, "kv_transports", transports)
        if self.test_kv_push_pause_s < 0:
            raise ValueError(f"test_kv_push_pause_s must be >= 0; got {self.test_kv_push_pause_s}")

    @classmethod
    def from_env(cls, environ=os.environ) -> WorkerConfig:
        def number(name: str, default):
            value = environ.get(name)
            try:
                return default if value in (None, "") else int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer; got {value!r}") from None

        engine = EngineConfig(model=environ.get("PAGEWIRE_MODEL") or None,
                              load_format=environ.get("PAGEWIRE_LOAD_FORMAT") or "auto",
                              kv_cache_memory_bytes=number("PAGEWIRE_KV_CACHE_BYTES", None),
                              max_model_len=number("PAGEWIRE_MAX_MODEL_LEN", None),
                              kv_cache_dtype=environ.get("PAGEWIRE_KV_CACHE_DTYPE") or "auto",
                              speculative_config=environ.get("PAGEWIRE_SPECULATIVE_CONFIG"),
                              quantization=environ.get("PAGEWIRE_QUANTIZATION") or None,
                              tensor_parallel_size=number("PAGEWIRE_TENSOR_PARALLEL_SIZE", 1),
                              pipeline_parallel_size=number("PAGEWIRE_PIPELINE_PARALLEL_SIZE",
                                                            1),
                              show_progress=False)
        return cls(role=environ.get("PAGEWIRE_WORKER_ROLE", "both"),
                   host=environ.get("PAGEWIRE_WORKER_HOST", "127.0.0.1"),
                   port=number("PAGEWIRE_WORKER_PORT", 50061),
                   worker_id=environ.get("PAGEWIRE_WORKER_ID") or None, engine=engine,
                   redis_url=environ.get("PAGEWIRE_REDIS_URL") or None,
                   redis_namespace=environ.get("PAGEWIRE_REDIS_NAMESPACE", "pagewire"),
                   advertise_address=environ.get("PAGEWIRE_WORKER_ADVERTISE") or None,
                   kv_transports=transport_names(environ.get("PAGEWIRE_KV_TRANSPORTS"))
                   or KV_TRANSPORTS,
                   shm_dir=environ.get("PAGEWIRE_SHM_DIR") or "/dev/shm",
                   test_kv_push_pause_s=float(environ.get("PAGEWIRE_TEST_KV_PUSH_PAUSE_S") or 0))


def transport_names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def advertised_address(config: WorkerConfig, port: int) -> str:
    """host:port the registry tells others: --advertise, else the bound host; bound to every
    interface, the local address of the route to Redis's host (where the router and the other
    workers are too), so each replica of a scaled compose service announces its own IP."""
    if config.advertise_address:
        return config.advertise_address
    host = config.host
    if host in WILDCARD_HOSTS:
        host = _address_toward(urlparse(config.redis_url or "").hostname)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_toward(peer_host: str | None) -> str:
    try:
        family, kind, _, _, peer = socket.getaddrinfo(peer_host or "localhost", 9,
                                                      type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind) as probe:
            probe.connect(peer)  # UDP: sends nothing, only picks the route and its source
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
