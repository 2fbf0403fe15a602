"""Real service processes for fault tests, and the check every fault test ends with.

`ProcessCluster` starts the pipeline as `pagewire serve ROLE` processes (what `pagewire up` and
compose run) against the CI's Redis under a namespace of its own, each logging to a file of its
own, so a test can kill any one with a real signal, read what it logged, and start it again on
the same port. `assert_no_kv_leaked` is the end of every fault test: through the gateway's
`/cluster`, every surviving worker's free KV blocks equal its total, with nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from pagewire import launcher
from pagewire.import_roots import pagewire_argv
from pagewire.kv_transport.nixl_agent import nixl_available
from tests.integration.redis_helpers import REDIS_URL, delete_namespace

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048  # the KV cache must hold one whole sequence: keeps each worker small
READY_TIMEOUT_S = 120.0  # a worker loads the model; several do at once on two cores
SERVE = pagewire_argv("serve")
ROOT = Path(__file__).resolve().parents[2]  # services start where a newcomer starts them


def wait_for(condition: Callable[[], object], timeout_s: float, what: str,
             interval_s: float = 0.2):
    """condition()'s first truthy value, polled until timeout_s; fails with `what`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} (after {timeout_s:.0f} s)"
        time.sleep(interval_s)
    return value


# Every KV transport that runs on this machine's CPU: the fault tests that move KV run on each.
TRANSPORTS = ["shm", "grpc", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="nixl is not installed"))]


def kv_bytes_by_transport(base_url: str) -> dict[str, float]:
    """The gateway's pagewire:kv_transfer_bytes_total, per transport."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {line.split('transport="')[1].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("pagewire:kv_transfer_bytes_total{")}


def cluster_workers(base_url: str) -> list[dict]:
    """The gateway's /cluster: every worker the router sees, with its last heartbeat."""
    reply = httpx.get(f"{base_url}/cluster", timeout=10)
    reply.raise_for_status()
    return reply.json()["workers"]


def assert_no_kv_leaked(base_url: str, dead_addresses: Iterable[str] = (),
                        timeout_s: float = 20.0) -> list[dict]:
    """Every surviving worker in /cluster ends with all its KV blocks free and nothing running
    or waiting. Heartbeats lag (one a second), so this waits for them; `dead_addresses` are
    killed workers whose registry entry has not expired yet (their numbers are stale)."""
    dead = set(dead_addresses)
    last: list[dict] = []

    def all_free() -> bool:
        nonlocal last
        try:
            last = [w for w in cluster_workers(base_url) if w["address"] not in dead]
        except httpx.HTTPError:
            return False  # the router may be coming back
        return bool(last) and all(
            w["kv_blocks_free"] == w["kv_blocks_total"] > 0 and w["running"] == 0 and
            w["waiting"] == 0 for w in last)

    deadline = time.monotonic() + timeout_s
    while not all_free():
        assert time.monotonic() < deadline, f"KV blocks leaked or requests left running: {last}"
        time.sleep(0.3)
    return last


@dataclass
class Service:
    name: str  # "tokenizer", "router", "gateway", "prefill-0", "decode-1"...
    port: int
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ProcessCluster:
    """tokenizer, router, `prefill` + `decode` workers and a gateway, one process each."""

    def __init__(self, log_dir: Path, prefill: int = 1, decode: int = 1,
                 kv_cache_bytes: int = 128 << 20,
                 worker_env: dict[str, str] | None = None) -> None:
        self.namespace = f"pwfault-{uuid.uuid4().hex[:12]}"
        self.log_dir = log_dir
        self.services: dict[str, Service] = {}
        self._add("tokenizer", lambda port: ["tokenizer", "--port", str(port)])
        for role, count in (("prefill", prefill), ("decode", decode)):
            for i in range(count):
                self._add(f"{role}-{i}", lambda port, role=role: [
                    "worker", "--role", role, "--port", str(port), "--redis-url", REDIS_URL,
                    "--redis-namespace", self.namespace, "--kv-cache-bytes",
                    str(kv_cache_bytes), "--max-model-len", str(MAX_MODEL_LEN)], env=worker_env)
        self._add("router", lambda port: [
            "router", "--port", str(port), "--redis-url", REDIS_URL, "--redis-namespace",
            self.namespace])
        self._add_gateway("gateway", ())
        self.base = f"http://{self['gateway'].address}"

    def _add_gateway(self, name: str, args: Iterable[str]) -> Service:
        return self._add(name, lambda port: [
            "gateway", "--port", str(port), "--tokenizer-address", self["tokenizer"].address,
            "--router-address", self["router"].address, *args])

    def _add(self, name: str, args: Callable[[int], list[str]],
             env: dict[str, str] | None = None) -> Service:
        port = launcher.free_port()
        service = Service(name, port, SERVE + args(port), {**os.environ, **(env or {})},
                          self.log_dir / f"{name}.log")
        self.services[name] = service
        return service

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def workers(self) -> list[Service]:
        return [s for s in self.services.values() if s.name.startswith(("prefill", "decode"))]

    # ---- processes ----------------------------------------------------------------------------

    def start(self) -> ProcessCluster:
        try:
            for service in self.services.values():
                if not service.name.startswith("gateway"):  # all at once: workers load slowly
                    self._spawn(service)
            for service in self.services.values():
                if not service.name.startswith("gateway"):
                    self._wait_ready(service)
            self._spawn(self["gateway"])
            self._wait_ready(self["gateway"])
            listed: list[dict] = []

            def all_registered() -> bool:
                nonlocal listed
                listed = cluster_workers(self.base)
                return len(listed) == len(self.workers)
            try:
                wait_for(all_registered, 60, "the workers never all registered")
            except AssertionError as exc:
                tails = "\n".join(f"--- {w.name}\n{w.log()[-1500:]}" for w in self.workers)
                raise AssertionError(f"{exc}: /cluster lists {[w['id'] for w in listed]}"
                                     f"\n{tails}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def start_gateway(self, name: str, args: Iterable[str]) -> str:
        """One more gateway on the same tokenizer and router (other flags); its base URL."""
        gateway = self._add_gateway(name, args)
        self._spawn(gateway)
        self._wait_ready(gateway)
        return f"http://{gateway.address}"

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        service = self[name]
        assert service.alive, f"{name} is not running"
        os.kill(service.process.pid, signum)
        service.process.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Starts a killed service again, same flags and port, and waits until it serves."""
        service = self[name]
        assert not service.alive, f"{name} is still running"
        self._spawn(service)
        self._wait_ready(service)

    def dead_worker_addresses(self) -> list[str]:
        return [w.address for w in self.workers if not w.alive]

    def stop(self) -> None:
        running = [s for s in reversed(self.services.values()) if s.alive]
        for service in running:
            service.process.terminate()
        for service in running:
            try:
                service.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        try:
            delete_namespace(client, self.namespace)
        finally:
            client.close()

    def _spawn(self, service: Service) -> None:
        with open(service.log_path, "ab") as log:
            service.process = subprocess.Popen(
                service.argv, stdout=log, stderr=subprocess.STDOUT, env=service.env,
                start_new_session=True, preexec_fn=launcher._die_with_parent, cwd=ROOT)

    def _wait_ready(self, service: Service) -> None:
        if service.name.startswith("gateway"):
            ready = lambda: launcher.http_healthy(f"http://{service.address}/health")
        else:
            ready = lambda: launcher.grpc_healthy(service.address)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():
            if not service.alive:
                raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
            assert time.monotonic() < deadline, f"{service.name} was not ready in time"
            time.sleep(0.2)
