"""Hosts for the multi-host test: Linux network namespaces on one bridge, each joined by a veth
pair (a cable that `cut` pulls), each with an /etc/hosts that resolves compose's service names
the way compose's DNS does. Needs root and iproute2; `teardown` removes everything it made."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*


class NamespacesUnavailable(Exception):
    """This machine cannot make network namespaces (no root, no iproute2, no CAP_SYS_ADMIN)."""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    name: str  # short: prefill, decode, ...
    namespace: str
    address: str  # its IPv4 address on the bridge
    cable: str  # its veth end in the root namespace, on the bridge
    aliases: tuple[str, ...]  # the compose service names it answers to


@dataclass
class Network:
    """A bridge in the root namespace (which has an address on it: the test's client) and one
    namespace per host. Subnet 10.213.N.0/24, N picked free."""

    tag: str = field(default_factory=lambda: f"pw{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    _made: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) to undo

    def __post_init__(self) -> None:
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            raise NamespacesUnavailable("needs Linux and root")
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("needs iproute2's `ip` (apt-get install iproute2)")
        self._made_etc = not NETNS_ETC.exists()
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        self.prefix = next(f"10.213.{n}" for n in range(20, 250) if f"10.213.{n}." not in routes)
        self.bridge = f"{self.tag}br"
        try:
            ip("link", "add", self.bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            raise NamespacesUnavailable(f"`ip link add ... type bridge` failed: "
                                        f"{exc.stderr.strip()}") from None
        self._made.append(("link", self.bridge))
        try:
            ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except subprocess.CalledProcessError:
            self.teardown()
            raise

    def add_host(self, name: str, aliases: tuple[str, ...]) -> Host:
        namespace, cable = f"{self.tag}-{name}", f"{self.tag}{name[:4]}"
        try:
            ip("netns", "add", namespace)
        except subprocess.CalledProcessError as exc:
            raise NamespacesUnavailable(f"`ip netns add` failed: {exc.stderr.strip()}") from None
        self._made.append(("netns", namespace))
        address = f"{self.prefix}.{len(self.hosts) + 2}"
        ip("link", "add", cable, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._made.append(("link", cable))
        ip("link", "set", cable, "master", self.bridge, "up")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        host = Host(name, namespace, address, cable, aliases)
        self.hosts[name] = host
        return host

    def write_hosts_files(self) -> None:
        """Every host resolves every service name, as compose's DNS does on its network."""
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {' '.join(h.aliases)}"
                                           for h in self.hosts.values()]
        for host in self.hosts.values():
            folder = NETNS_ETC / host.namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def run(self, host: Host, argv: list[str], timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", host.namespace, *argv], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, host: Host, argv: list[str], env: dict[str, str],
              log: Path) -> subprocess.Popen:
        """A process on `host` (its own session: teardown signals its group, by id)."""
        with log.open("w") as out:
            process = subprocess.Popen(["ip", "netns", "exec", host.namespace, *argv], env=env,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=_die_with_parent)
        self.processes.append(process)
        return process

    def cut(self, host: Host) -> None:
        """Pulls the host's cable: its packets are dropped, nobody is told (no RST, no FIN)."""
        ip("link", "set", host.cable, "down")

    def tx_bytes(self, host: Host) -> int:
        """Bytes the bridge has sent down `host`'s cable."""
        return int(Path(f"/sys/class/net/{host.cable}/statistics/tx_bytes").read_text())

    def teardown(self) -> None:
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=10)
        for kind, name in reversed(self._made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            else:  # a veth end goes with its namespace; delete what is left
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        if self._made_etc and NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
            NETNS_ETC.rmdir()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signum)  # the group this test started, by its id
        except ProcessLookupError:
            pass


def _die_with_parent() -> None:
    """A killed test run never leaves services behind (SIGTERM when pytest dies)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
