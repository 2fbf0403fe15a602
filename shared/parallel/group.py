"""The collectives a tensor-parallel model and engine use: one process group per engine, on
its own TCP store (so several engines can live in one process, as tests make them), gloo on
CPU and NCCL on CUDA, outside torch.distributed's global default group. A collective that
fails (a rank died, its socket closed) raises: the engine stops and its worker is treated as
lost.

A second, gloo group carries rank 0's control messages (parallel/step_message.py) as host
tensors. Its followers wait for the next message without a deadline: an engine may sit idle
for hours, and rank 0's death closes its sockets, which ends the wait at once (with the data
group's timeout, an engine idle for a minute lost its followers). On CUDA it also lets a
follower read the next step's inputs while its GPU still runs the last one, and launch the
next forward behind it, where a message over NCCL makes its host wait for its GPU before
every step."""

from __future__ import annotations

import datetime
import os
from urllib.parse import urlparse

import torch
import torch.distributed as dist

JOIN_TIMEOUT = datetime.timedelta(seconds=60)  # for the ranks to start and meet at the store
CONTROL_TIMEOUT = datetime.timedelta(days=3650)  # "forever", within gloo's clock arithmetic


def collective_timeout() -> datetime.timedelta:
    """A rank that dies mid-collective usually closes its sockets and the others fail at once;
    this bounds the rest (a hung, not dead, peer). PAGEWIRE_COLLECTIVE_TIMEOUT_S: 60 s."""
    return datetime.timedelta(seconds=float(os.environ.get("PAGEWIRE_COLLECTIVE_TIMEOUT_S",
                                                           60)))


class TPGroup:
    def __init__(self, rank: int, size: int, init_method: str | None, device: torch.device,
                 store: dist.Store | None = None):
        """init_method: tcp://HOST:PORT, where rank 0 listens for the others (or `store`: a
        sub-group's, from `subgroup`, which carries no control messages)."""
        self.rank, self.size, self.device = rank, size, device
        timeout = collective_timeout()
        if store is None:
            address = urlparse(init_method)
            store = dist.TCPStore(address.hostname, address.port, size, is_master=rank == 0,
                                  timeout=JOIN_TIMEOUT)
        self._store = store
        if device.type == "cuda":
            self._pg = dist.ProcessGroupNCCL(self._store, rank, size)
        else:
            self._pg = dist.ProcessGroupGloo(self._store, rank, size, timeout)
        self._control = None if init_method is None else dist.ProcessGroupGloo(
            dist.PrefixStore("control", self._store), rank, size, CONTROL_TIMEOUT)

    def subgroup(self, name: str, rank: int, size: int) -> TPGroup:
        """A group of some of these ranks (a pipeline stage's TP ranks), on this group's store
        under its own prefix; every member calls it with the same name."""
        return TPGroup(rank, size, None, self.device, dist.PrefixStore(name, self._store))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel layers' partial products)."""
        self._pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape everywhere), in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._pg.allgather([parts], [x]).wait()
        return parts

    def gather_columns(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """x [rows, sizes[rank]] on every rank -> [rows, sum(sizes)] (the LM head's slices of
        the vocabulary; padded to the widest slice for the collective)."""
        width = max(sizes)
        padded = x if x.shape[1] == width else torch.nn.functional.pad(
            x, (0, width - x.shape[1]))
        parts = self.all_gather(padded.contiguous())
        return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1)

    def min(self, value: int) -> int:
        """The smallest of every rank's value (a KV budget all ranks can hold)."""
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._pg.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """From rank 0 to all (in place)."""
        self._pg.broadcast(x, 0).wait()
        return x

    def broadcast_host(self, x: torch.Tensor) -> torch.Tensor:
        """From rank 0 to all (in place), a CPU tensor over the control group."""
        self._control.broadcast(x, 0).wait()
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Point to point (a pipeline stage's activations to the next)."""
        self._pg.send([x.contiguous()], dst, 0).wait()

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        self._pg.recv([x], src, 0).wait()
        return x

    def start_recv(self, x: torch.Tensor, src: int):
        """Posts a receive into x; returns a function that waits for it and returns x (the
        sender need not wait for us meanwhile)."""
        work = self._pg.recv([x], src, 0)
        return lambda: (work.wait(), x)[1]

    def close(self) -> None:
        self._pg = self._control = self._store = None
