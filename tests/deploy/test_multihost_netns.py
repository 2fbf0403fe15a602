"""The deployment across hosts, without Docker: compose's services, each started with compose's
own command, environment and health check, on four Linux network namespaces cabled (veth pairs)
to one bridge: Redis on one host; tokenizer, router and gateway on a second; prefill on a
third; decode on a fourth. Names resolve as on compose's network. A request crosses the hosts
(the prompt's KV travels down the decode host's cable); then that cable is pulled mid-stream,
and the client must get an error promptly, and the next request a clean one. Skips where the
machine cannot make namespaces (needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN, and
iproute2)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pagewire.import_roots import pagewire_argv
from pagewire.kv_transport import KV_TRANSPORTS
from pagewire.kv_transport.nixl_agent import nixl_available
from tests.deploy.compose_file import environment_of, load_compose
from tests.deploy.netns import Host, NamespacesUnavailable, Network

pytestmark = pytest.mark.slow

SERVICES = load_compose()["services"]
LAYOUT = {  # host -> the compose services it runs
    "redis": ("redis",),
    "front": ("tokenizer", "router", "gateway"),
    "prefill": ("prefill",),
    "decode": ("decode",),
}
READY_S = 150.0  # five processes loading on two cores
# The redis image is built with protected mode off; Debian's redis-server is not.
REDIS_IMAGE_DEFAULTS = ["--protected-mode", "no"]
MODEL = "SmolLM2-135M-Instruct"
PROMPT = ("The history of the bridge is long and full of small surprises; engineers learned "
          "from each collapse, and every generation built a little further than the last. ")
CUT_ERROR_WITHIN_S = 30.0  # the client hears of the lost decode host within this
REGISTRY_DROPS_WITHIN_S = 15.0  # its heartbeats stop: its registry entry expires (TTL 5 s)
NEXT_REQUEST_WITHIN_S = 5.0  # then a new request is answered (an error) within this


@dataclass
class Cluster:
    network: Network
    hosts: dict[str, Host]
    logs: Path
    cut_at: float | None = None

    def host_of(self, service: str) -> Host:
        return next(self.hosts[h] for h, services in LAYOUT.items() if service in services)

    @property
    def base_url(self) -> str:
        (mapping,) = SERVICES["gateway"]["ports"]
        return f"http://{self.host_of('gateway').address}:{str(mapping).rsplit(':', 1)[1]}"

    def child_env(self, service: str) -> dict[str, str]:
        """This machine's environment, less PAGEWIRE_* and proxies, plus compose's, plus what
        hosts of their own would not share: namespaces share this machine's /dev/shm and its
        processes' memory, and workers that can reach each other's rightly take the shared-
        memory KV transport, or let UCX (under NIXL) copy across processes. Each host gets a
        shared-memory folder of its own, and UCX is held to TCP. Compose's containers offer
        only gRPC (they share no /dev/shm and their image has no NIXL); these hosts offer every
        transport, as hosts with the `nixl` extra do, so the pair picks the one that crosses
        hosts."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PAGEWIRE_") and "proxy" not in k.lower()}
        shm_dir = self.logs / "shm" / self.host_of(service).name
        shm_dir.mkdir(parents=True, exist_ok=True)
        return {**env, "PYTHONUNBUFFERED": "1", **environment_of(SERVICES[service]),
                "PAGEWIRE_SHM_DIR": str(shm_dir), "UCX_TLS": "tcp",
                "PAGEWIRE_KV_TRANSPORTS": ",".join(KV_TRANSPORTS)}

    def launch(self, service: str) -> None:
        command = list(SERVICES[service]["command"])
        if command[:1] == ["pagewire"]:  # the same entry point, on this interpreter
            command = pagewire_argv(*command[1:])
        else:
            command += REDIS_IMAGE_DEFAULTS
        self.network.start(self.host_of(service), command, self.child_env(service),
                           self.logs / f"{service}.log")

    def wait_healthy(self, service: str, deadline: float) -> None:
        """Compose's health check for `service`, run on its host until it passes."""
        test = list(SERVICES[service]["healthcheck"]["test"])
        assert test[0] == "CMD"
        argv = [sys.executable if test[1] == "python" else test[1], *test[2:]]
        while True:
            if self.network.run(self.host_of(service), argv).returncode == 0:
                return
            self.check_alive()
            assert time.monotonic() < deadline, f"{service} not healthy\n{self.log_tails()}"
            time.sleep(0.5)

    def check_alive(self) -> None:
        for process in self.network.processes:
            assert process.poll() is None, f"{process.args} exited\n{self.log_tails()}"

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:])
                         for log in sorted(self.logs.glob("*.log")))

    def cut_decode_host(self) -> float:
        """Pulls the decode host's cable, once; returns when."""
        if self.cut_at is None:
            self.network.cut(self.hosts["decode"])
            self.cut_at = time.monotonic()
        return self.cut_at

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=10, trust_env=False)

    def workers(self) -> list[dict]:
        return self.get("/cluster").json()["workers"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        network = Network()
    except NamespacesUnavailable as exc:
        pytest.skip(f"this machine cannot make network namespaces: {exc}")
    try:
        try:
            hosts = {name: network.add_host(name, services) for name, services in LAYOUT.items()}
        except NamespacesUnavailable as exc:
            pytest.skip(f"this machine cannot make network namespaces: {exc}")
        network.write_hosts_files()
        cluster = Cluster(network, hosts, tmp_path_factory.mktemp("netns-logs"))
        deadline = time.monotonic() + READY_S
        # compose's depends_on order: redis; then tokenizer, router and the workers; the gateway
        cluster.launch("redis")
        cluster.wait_healthy("redis", deadline)
        for service in ("tokenizer", "router", "prefill", "decode"):
            cluster.launch(service)
        for service in ("tokenizer", "router"):
            cluster.wait_healthy(service, deadline)
        cluster.launch("gateway")
        for service in ("gateway", "prefill", "decode"):
            cluster.wait_healthy(service, deadline)
        while len(cluster.workers()) < 2:  # both announced in Redis, seen by the router
            assert time.monotonic() < deadline, cluster.log_tails()
            time.sleep(0.5)
        yield cluster
    finally:
        network.teardown()


def complete(cluster: Cluster, max_tokens: int, timeout: float = 60) -> httpx.Response:
    return httpx.post(cluster.base_url + "/v1/completions", timeout=timeout, trust_env=False,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                            "temperature": 0})


def kv_bytes_sent(cluster: Cluster, transport: str = "") -> float:
    text = cluster.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pagewire:kv_transfer_bytes_total")
               and f'transport="{transport}' in line)


def test_each_host_announces_its_own_address(cluster):
    workers = {w["role"]: w for w in cluster.workers()}
    assert set(workers) == {"prefill", "decode"}
    for role, worker in workers.items():
        # Bound to 0.0.0.0 with no advertise setting: the address comes from the host's route.
        port = environment_of(SERVICES[role])["PAGEWIRE_WORKER_PORT"]
        assert worker["address"] == f"{cluster.hosts[role].address}:{port}"
        assert worker["id"] == f"{role}@{worker['address']}"


def test_a_request_crosses_the_hosts_and_its_kv_the_decode_cable(cluster):
    decode = cluster.hosts["decode"]
    cable_before, kv_before = cluster.network.tx_bytes(decode), kv_bytes_sent(cluster)
    reply = complete(cluster, max_tokens=8)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"]
    kv_bytes = kv_bytes_sent(cluster) - kv_before
    assert kv_bytes > 0, "the router reported no KV transfer"
    # Across hosts: NIXL where it is installed (as in CI), else gRPC bytes.
    transport = "nixl" if nixl_available() else "grpc"
    assert kv_bytes_sent(cluster, transport) == kv_bytes_sent(cluster), transport
    # The KV went from the prefill host to the decode host over the bridge, not over loopback.
    assert cluster.network.tx_bytes(decode) - cable_before >= kv_bytes
    deadline = time.monotonic() + 5  # heartbeats (every second) carry the counts
    while {w["role"]: w["served"] for w in cluster.workers()} != {"prefill": 1, "decode": 1}:
        assert time.monotonic() < deadline, cluster.workers()
        time.sleep(0.3)


def test_cutting_the_decode_hosts_cable_ends_its_stream_with_an_error_promptly(cluster):
    events: list[tuple[float, str]] = []  # (when, SSE data or the client's own error)
    streaming = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True,
                "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", cluster.base_url + "/v1/completions", json=body,
                              timeout=httpx.Timeout(10, read=120), trust_env=False) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        events.append((time.monotonic(), line[6:]))
                        if len(events) >= 5:
                            streaming.set()
        except httpx.HTTPError as exc:
            events.append((time.monotonic(), f"client error: {exc!r}"))
        finally:
            streaming.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert streaming.wait(60), cluster.log_tails()
    assert not events[-1][1].startswith("client error"), events[-1]
    cut_at = cluster.cut_decode_host()
    client.join(CUT_ERROR_WITHIN_S)
    assert not client.is_alive(), f"the stream still runs {CUT_ERROR_WITHIN_S:.0f} s after the " \
                                  f"cut\n{cluster.log_tails()}"
    ended_at, last = events[-1]
    tail = [data for _, data in events[-3:]]
    print(f"the stream ended {ended_at - cut_at:.1f} s after the cut: {tail}")
    assert last == "[DONE]" and "error" in json.loads(events[-2][1]), tail  # not a normal end


def test_after_the_cut_a_new_request_gets_a_clean_error_promptly(cluster):
    cut_at = cluster.cut_decode_host()
    while any(w["role"] == "decode" for w in cluster.workers()):  # heartbeats stopped: expiry
        assert time.monotonic() - cut_at < REGISTRY_DROPS_WITHIN_S, cluster.workers()
        time.sleep(0.5)
    print(f"the registry dropped the decode host {time.monotonic() - cut_at:.1f} s after the cut")
    asked_at = time.monotonic()
    reply = complete(cluster, max_tokens=4, timeout=NEXT_REQUEST_WITHIN_S + 30)
    answered_s = time.monotonic() - asked_at
    print(f"the next request: {reply.status_code} after {answered_s:.1f} s: {reply.text[:200]}")
    assert reply.status_code == 503, reply.text  # no decode host left: a clean error
    assert reply.json()["error"]["message"]
    assert answered_s < NEXT_REQUEST_WITHIN_S
    assert cluster.get("/health").status_code == 200
    cluster.check_alive()  # a host lost its link; no process died of it
