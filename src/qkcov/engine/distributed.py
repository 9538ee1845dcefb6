"""Sharded runs on ``torch.distributed`` (one process per GPU, launched by ``torchrun``).

Records are sharded by *whole batches* (batch ``b`` goes to rank ``b % world_size``), so every
forward pass sees exactly the batch (and padding) of a one-process run; float64 accumulators
are then summed across ranks and per-record outputs gathered back in record order. In one
process every helper here is a no-op, so engine code calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

__all__ = [
    "Dist",
    "shard_batches",
    "all_reduce_sum",
    "gather_objects",
    "barrier",
    "broadcast_object",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly one-process) run.

    ``rank`` in ``[0, world_size)``; ``device`` is where this rank runs the model
    (``cuda:LOCAL_RANK`` under torchrun with CUDA, else CPU); ``backend`` is ``"gloo"``,
    ``"nccl"`` or ``None`` (one process, no process group).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when there is a process group to talk to (``world_size > 1``)."""
        return self.world_size > 1

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Dist:
        """A one-process run on ``device``."""
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> Dist:
        """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and join the process group.

        ``WORLD_SIZE`` unset or 1: a one-process run on ``device`` (default CPU), nothing is
        initialised. Otherwise the process group is initialised (once) with ``nccl`` and
        device ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is not ``"cpu"``,
        else ``gloo`` on CPU.
        """
        world = _env_int("WORLD_SIZE", 1)
        if world < 1:
            raise ValueError(f"environment variable WORLD_SIZE={world}: expected >= 1")
        if world == 1:
            return cls.single(device or "cpu")
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if not 0 <= rank < world:
            raise ValueError(f"environment variable RANK={rank}: expected 0 <= RANK < {world}")
        want_cpu = device is not None and torch.device(device).type == "cpu"
        if torch.cuda.is_available() and not want_cpu:
            if local >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) "
                    "are visible; launch at most one process per GPU"
                )
            dev, backend = torch.device("cuda", local), "nccl"
            torch.cuda.set_device(dev)
        elif device is not None and torch.device(device).type == "cuda":
            raise ValueError(f"--device {device}: CUDA is not available")
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend, rank=rank, world_size=world)
        elif tdist.get_world_size() != world or tdist.get_rank() != rank:
            raise ValueError(
                "torch.distributed is already initialised with a different rank/world size "
                f"({tdist.get_rank()}/{tdist.get_world_size()}) than the environment "
                f"({rank}/{world})"
            )
        return cls(rank, world, dev, local, tdist.get_backend())


def _check(dist: Dist | None, comm: bool = True) -> Dist:
    if dist is None:
        return Dist()
    if not isinstance(dist, Dist):
        raise ValueError(f"dist must be a qkcov Dist or None, got {type(dist).__name__}")
    if not 0 <= dist.rank < dist.world_size:
        raise ValueError(f"dist: rank {dist.rank} is outside [0, world_size={dist.world_size})")
    if comm and dist.enabled and not tdist.is_initialized():
        raise ValueError(
            f"dist says world_size={dist.world_size} but torch.distributed is not initialised; "
            "build it with Dist.from_env() under torchrun"
        )
    return dist


def shard_batches(n_items: int, batch_size: int, dist: Dist | None = None) -> list[range]:
    """This rank's whole batches of ``range(n_items)``: batch ``b`` goes to rank ``b % world``.

    Each range is exactly a batch of a one-process run (``[b·bs, min((b+1)·bs, n))``), so
    padding and results per batch are identical; ranks may get no batch at all.
    """
    dist = _check(dist, comm=False)  # pure arithmetic: no process group needed
    if not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be a non-negative integer, got {n_items!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    starts = range(0, n_items, batch_size)
    return [
        range(s, min(s + batch_size, n_items))
        for b, s in enumerate(starts)
        if b % dist.world_size == dist.rank
    ]


def all_reduce_sum(tensors: list[torch.Tensor], dist: Dist | None = None) -> list[torch.Tensor]:
    """Sum ``tensors`` over ranks, in place (each keeps its device and dtype); returns them.

    Meant for float64 sums and counts. Tensors are moved to the backend's device for the
    reduction (``dist.device`` for nccl) and the sums copied back.
    """
    dist = _check(dist)
    if not dist.enabled or not tensors:
        return tensors
    comm = dist.device if dist.backend == "nccl" else torch.device("cpu")
    # One flat buffer per dtype: one collective instead of one per tensor.
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return tensors


def gather_objects(obj: Any, dist: Dist | None = None) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors are best moved to CPU first), in rank order,
    on every rank. One process: ``[obj]``."""
    dist = _check(dist)
    if not dist.enabled:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def barrier(dist: Dist | None = None) -> None:
    """Wait for every rank (no-op in one process)."""
    dist = _check(dist)
    if dist.enabled:
        tdist.barrier()


def broadcast_object(obj: Any, dist: Dist | None = None, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank (the other ranks' ``obj`` is ignored)."""
    dist = _check(dist)
    if not dist.enabled:
        return obj
    box = [obj if dist.rank == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
