"""Security basics: the API key is compared in constant time and guards every route but /health;
internal gRPC services listen on loopback unless told otherwise; nothing that crosses a process
boundary is unpickled or evaluated."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hmac
import socket
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from pagewire.services.gateway import server as gateway_server
from pagewire.services.gateway.app import _api_key_checker
from pagewire.services.gateway.errors import APIError
from pagewire.services.router import server as router_server
from pagewire.services.tokenizer import server as tokenizer_server
from pagewire.services.worker import server as worker_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "sekret-key"


def request_with(authorization: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", authorization.encode())]})


def test_api_key_is_compared_in_constant_time(monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(hmac, "compare_digest", spy)
    check = _api_key_checker(KEY)
    asyncio.run(check(request_with(f"Bearer {KEY}")))
    with pytest.raises(APIError):
        asyncio.run(check(request_with("Bearer wrong")))
    assert compared == [(KEY.encode(), KEY.encode()), (b"wrong", KEY.encode())]


ROUTES = [("GET", "/v1/models"), ("GET", "/cluster"), ("GET", "/metrics"),
          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]


@pytest.fixture(scope="module")
def keyed_port(stack):
    return stack._run(stack.start_gateway(dataclasses.replace(stack.gateway_config,
                                                              api_key=KEY)))


@pytest.mark.parametrize("method, route", ROUTES, ids=[route for _, route in ROUTES])
def test_every_route_but_health_needs_the_key_when_one_is_set(keyed_port, model, method, route):
    url = f"http://127.0.0.1:{keyed_port}{route}"
    body = {"model": model, "prompt": "Hi", "max_tokens": 1} if "chat" not in route else {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    refused = [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", b"Bearer \xff"]
    for authorization in refused:
        headers = {} if authorization is None else {"authorization": authorization}
        reply = httpx.request(method, url, json=body if method == "POST" else None,
                              headers=headers, timeout=60)
        assert reply.status_code == 401, (authorization, reply.text)
        assert reply.json()["error"]["code"] == "invalid_api_key"
    reply = httpx.request(method, url, json=body if method == "POST" else None,
                          headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == 200, reply.text


def test_health_needs_no_key(keyed_port):
    assert httpx.get(f"http://127.0.0.1:{keyed_port}/health", timeout=10).status_code == 200


SERVICE_ENV = ["PAGEWIRE_TOKENIZER_HOST", "PAGEWIRE_ROUTER_HOST", "PAGEWIRE_WORKER_HOST",
               "PAGEWIRE_GATEWAY_HOST", "PAGEWIRE_API_KEY"]


def test_every_service_listens_on_loopback_by_default(monkeypatch):
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    configs = [tokenizer_server.parse_args([]), router_server.parse_args([]),
               worker_server.parse_args([]), gateway_server.parse_config([])]
    assert [config.host for config in configs] == ["127.0.0.1"] * 4
    assert gateway_server.parse_config([]).api_key is None


def test_grpc_servers_refuse_connections_from_other_interfaces(stack):
    outward = _outward_address()
    if outward is None or outward.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    for server in (stack.tokenizer, stack.router, *stack.workers):
        with socket.create_connection(("127.0.0.1", server.bound_port), timeout=2):
            pass
        with pytest.raises(OSError):
            socket.create_connection((outward, server.bound_port), timeout=2).close()


def _outward_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # UDP: sends nothing, only picks the route
            return probe.getsockname()[0]
    except OSError:
        return None


# Modules and calls that turn bytes into code or arbitrary objects.
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec"}


def _unsafe_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names]
            found += [f"imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            func, keywords = node.func, {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                found.append(f"calls {func.id}()")
            elif isinstance(func, ast.Attribute) and func.attr == "load" and \
                    isinstance(func.value, ast.Name) and func.value.id == "torch":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append("calls torch.load without weights_only=True")
            elif isinstance(func, ast.Attribute) and func.attr == "load" and \
                    isinstance(keywords.get("allow_pickle"), ast.Constant) and \
                    keywords["allow_pickle"].value is True:
                found.append("loads with allow_pickle=True")
    return [f"{path.relative_to(ROOT)}:{use}" for use in found]


def test_nothing_unpickles_or_evaluates_data_from_another_process():
    sources = [path for folder in ("shared", "services", "kernels", "loadtests")
               for path in (ROOT / folder).rglob("*.py") if "/v1/" not in str(path)]
    assert len(sources) > 50
    assert [use for path in sources for use in _unsafe_uses(path)] == []
