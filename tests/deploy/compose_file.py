"""compose.yaml as the deployment tests read it: loaded, interpolated the way `docker compose`
does with no variables set, and each pagewire service's command parsed by the real CLI with
the service's environment, recording which variables the service read."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from pagewire import cli

ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def load_compose() -> dict:
    return _interpolate(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _interpolate(node):
    """${NAME} and ${NAME:-default} with nothing set, as compose resolves them by default."""
    if isinstance(node, dict):
        return {key: _interpolate(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(item) for item in node]
    if isinstance(node, str):
        text = _VARIABLE.sub(lambda m: m["default"] or "", node)
        assert "$" not in text, f"an interpolation these tests do not model: {node!r}"
        return text
    return node


def pagewire_services(compose: dict) -> dict[str, dict]:
    """The services that run `pagewire serve ROLE` (all but redis)."""
    return {name: service for name, service in compose["services"].items()
            if service.get("command", [])[:2] == ["pagewire", "serve"]}


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: "" if value is None else str(value) for name, value in env.items()}


@dataclass(frozen=True)
class ParsedService:
    role: str  # the `pagewire serve` role
    config: object  # the service's config dataclass, as its parse_args built it
    env_read: frozenset[str]  # PAGEWIRE_* variables the service looked up while parsing


def parse_service(service: dict) -> ParsedService:
    """Runs `pagewire <command>` through pagewire.cli.main with the service's environment,
    stopping where the service would start: its main(argv) only parses its flags."""
    command = service["command"]
    role = command[2]
    module = importlib.import_module(cli.SERVICES[role])
    parse = getattr(module, "parse_args", None) or module.parse_config
    parsed = {}

    def parse_only(argv):
        parsed["config"] = parse(argv)
        return 0

    with mock.patch.object(module, "main", parse_only), \
            service_environment(environment_of(service)) as env_read:
        assert cli.main(command[1:]) == 0
    return ParsedService(role, parsed["config"], frozenset(env_read))


@contextmanager
def service_environment(env: dict[str, str]) -> Iterator[set[str]]:
    """os.environ holding only `env`'s PAGEWIRE_* variables; yields the PAGEWIRE_* names read
    (every lookup, os.environ[...] or .get, goes through _Environ.__getitem__)."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PAGEWIRE_")}
    read: set[str] = set()
    environ_type = type(os.environ)
    original = environ_type.__getitem__

    def recording_getitem(self, key):
        if self is os.environ and isinstance(key, str) and key.startswith("PAGEWIRE_"):
            read.add(key)
        return original(self, key)

    with mock.patch.dict(os.environ, {**outside, **env}, clear=True), \
            mock.patch.object(environ_type, "__getitem__", recording_getitem):
        yield read
