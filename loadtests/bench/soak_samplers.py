"""What the soak (`loadtests/soak.py`) watches while it runs: the resident memory of every
process of the stack (read from /proc, Linux), and the gateway's `/cluster` (each worker's free
and total KV blocks, running and waiting requests).

The processes are those under one `pagewire up` launcher, found once the stack serves: a helper
that starts later (a compiler on first use) is noted, not watched. Sample times are monotonic
seconds; the soak rebases them on its own start.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx

PROC = Path("/proc")


# ---- processes -------------------------------------------------------------------------------

def cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process this user can see."""
    parents = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def descendants(root_pid: int) -> list[int]:
    """root_pid and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, parent in parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size, or None when the process is gone."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def describe(argv: list[str]) -> str:
    """A service's name from its command line: `... serve worker --role decode` -> "decode"."""
    if "serve" in argv[:-1]:
        service = argv[argv.index("serve") + 1]
        if service == "worker" and "--role" in argv[:-1]:
            role = argv[argv.index("--role") + 1]
            return "colocated worker" if role == "both" else f"{role} worker"
        return service
    if "up" in argv and any("pagewire" in part for part in argv):
        return "launcher"
    return os.path.basename(argv[0]) if argv else "?"


def name_processes(pids: list[int]) -> dict[str, int]:
    """A readable, unique name per process: "decode worker", "prefill worker 2"..."""
    described = [(pid, describe(cmdline(pid))) for pid in pids]
    total = Counter(name for _, name in described)
    seen: Counter[str] = Counter()
    names = {}
    for pid, name in sorted(described):
        seen[name] += 1
        names[name if total[name] == 1 else f"{name} {seen[name]}"] = pid
    return names


def find_launcher(port: int) -> int | None:
    """The `pagewire up` serving on this port (for --base-url), if it runs on this machine."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if describe(argv) != "launcher":
            continue
        flag_port = argv[argv.index("--port") + 1] if "--port" in argv[:-1] else "8000"
        if flag_port == str(port):
            return int(entry.name)
    return None


# ---- the recorder ----------------------------------------------------------------------------

class Recorder:
    """Samples RSS and /cluster every interval_s until stopped."""

    def __init__(self, client: httpx.AsyncClient, root_pid: int | None, interval_s: float):
        self.client, self.interval_s = client, interval_s
        self.processes = name_processes(descendants(root_pid)) if root_pid else {}
        self.appeared: dict[int, str] = {}
        self._root_pid = root_pid
        self.rss: dict[str, list[list[float]]] = {name: [] for name in self.processes}
        self.cluster: list[dict] = []
        self._stopped = asyncio.Event()

    def alive(self) -> dict[str, bool]:
        return {name: rss_bytes(pid) is not None for name, pid in self.processes.items()}

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        while not self._stopped.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(self._stopped.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def sample(self) -> None:
        now = time.monotonic()
        for name, pid in self.processes.items():
            rss = rss_bytes(pid)
            if rss is not None:
                self.rss[name].append([now, rss])
        if self._root_pid:
            watched = set(self.processes.values())
            for pid in descendants(self._root_pid):
                if pid not in watched and pid not in self.appeared:
                    self.appeared[pid] = " ".join(cmdline(pid))[:200]
        self.cluster.append({"t": now, **await read_cluster(self.client)})


async def read_cluster(client: httpx.AsyncClient) -> dict:
    """{"workers": [...]} from the gateway's /cluster, or {"error": ...}."""
    try:
        reply = await client.get("/cluster", timeout=10)
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if reply.status_code != 200:
        return {"error": f"HTTP {reply.status_code}"}
    return {"workers": [{key: w[key] for key in ("id", "role", "running", "waiting",
                                                  "kv_blocks_free", "kv_blocks_total")}
                        for w in reply.json()["workers"]]}


async def wait_until_idle(client: httpx.AsyncClient, expected_workers: int,
                          timeout_s: float) -> list[dict] | None:
    """The workers once all their blocks are free and nothing runs (heartbeats lag a second
    or so), or as they were at timeout_s; None if /cluster never answered."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        sample = await read_cluster(client)
        if "workers" in sample:
            last = sample["workers"]
            if len(last) == expected_workers and all(
                    w["kv_blocks_free"] == w["kv_blocks_total"] and w["running"] == 0 and
                    w["waiting"] == 0 for w in last):
                return last
        if time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.5)
