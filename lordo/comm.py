"""Communicators: one interface, real processes or simulated workers.

A worker's code sees only `comm.rank`, `comm.world_size` and three collectives. The same
code runs under

* `DistComm`: a `torch.distributed` process group (NCCL on GPUs, gloo on CPU; torchrun,
  single- or multi-node), made by `init_distributed()`;
* `SimulatedComm`: M workers as threads of one process on one device, made by
  `run_simulated(fn, M)`; sums are taken in rank order, so results are deterministic.

    def worker(comm):
        t = torch.ones(3) * comm.rank
        comm.all_reduce_(t)            # sum over workers, in place
        return t
    run_simulated(worker, world_size=4)   # -> four tensors [6., 6., 6.]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Communicator(Protocol):
    """What a worker needs from its group: identity and in-place collectives."""

    rank: int
    world_size: int

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` by the sum of every worker's `tensor`."""

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Replace `tensor` by worker `src`'s `tensor`."""

    def barrier(self) -> None:
        """Wait until every worker arrives."""


class DistComm:
    """A `torch.distributed` process group (the default group unless one is given)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def init_distributed(device: str | torch.device | None = None) -> tuple[DistComm, torch.device]:
    """Join the process group torchrun describes in the environment; return (comm, device).

    device: "cuda" (the default where CUDA is available): NCCL, one GPU per local rank; "cpu": gloo, one
    thread per rank, since ranks share the cores.
    """
    if "RANK" not in os.environ:
        raise RuntimeError("init_distributed() needs torchrun's environment (RANK, WORLD_SIZE, ...); "
                           "start the script with `torchrun --nproc-per-node N ...`")
    kind = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} has no GPU of its own: this machine has "
                             f"{torch.cuda.device_count()}; allowed at most that many ranks per node with NCCL, "
                             "or init_distributed('cpu') for gloo")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif kind == "cpu":
        device = torch.device("cpu")
        torch.set_num_threads(1)
        backend = "gloo"
    else:
        raise ValueError(f"device={str(device)!r} is invalid for torchrun ranks: allowed cuda or cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistComm(), device


class _SimulatedGroup:
    """Rendezvous of M threads: each collective deposits, one thread combines, all read."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.result: torch.Tensor | None = None
        self.arrive = threading.Barrier(world_size, action=self._combine)
        self.leave = threading.Barrier(world_size)
        self.op = ""
        self.src = 0

    def _combine(self) -> None:
        if self.op == "sum":
            total = self.slots[0].clone()
            for t in self.slots[1:]:
                total += t
            self.result = total
        elif self.op == "broadcast":
            self.result = self.slots[self.src].clone()

    def collective(self, rank: int, op: str, tensor: torch.Tensor | None, src: int = 0) -> None:
        self.slots[rank] = tensor
        self.op, self.src = op, src
        self.arrive.wait()
        if op == "sum" or (op == "broadcast" and rank != src):
            tensor.copy_(self.result)
        # Nobody may deposit the next collective's tensor until everyone has read this result.
        self.leave.wait()

    def abort(self) -> None:
        self.arrive.abort()
        self.leave.abort()


class SimulatedComm:
    """One simulated worker's view of a `_SimulatedGroup`."""

    def __init__(self, group: _SimulatedGroup, rank: int):
        self._group = group
        self.rank = rank
        self.world_size = group.world_size

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        self._group.collective(self.rank, "sum", tensor)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._group.collective(self.rank, "broadcast", tensor, src)

    def barrier(self) -> None:
        self._group.collective(self.rank, "barrier", None)


@contextmanager
def cpu_threads(n: int):
    """Run the enclosed work on n intra-op CPU threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_simulated(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Run `fn(comm, *args, **kwargs)` as `world_size` simulated workers; return their results.

    Workers are threads (PyTorch releases the GIL inside its kernels). If one raises, the
    others are released from any collective they wait in, and the first error is re-raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size == 1:
        return [fn(SimulatedComm(_SimulatedGroup(1), 0), *args, **kwargs)]
    group = _SimulatedGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(SimulatedComm(group, rank), *args, **kwargs)
        except threading.BrokenBarrierError:
            pass  # another worker failed first; its error is the one reported
        except BaseException as e:  # re-raised in the caller's thread
            errors.append((rank, e))
            group.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"lordo-worker-{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank, error = errors[0]
        error.add_note(f"(raised in simulated worker {rank} of {world_size})")
        raise error
    return results


def disable_ddp_allreduce(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Turn a DistributedDataParallel wrapper's gradient all-reduce into a no-op, so each worker keeps
    its own gradients and lordo (which synchronizes itself) takes real local steps. Call it before the
    first backward; calling it again does nothing. DDP's buffer broadcasts (`broadcast_buffers`) stay."""
    if getattr(ddp_model, "_lordo_allreduce_disabled", False):
        return

    def keep_local(_state, bucket):   # no annotations: DDP checks them, and `from __future__` makes them strings
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    ddp_model.register_comm_hook(None, keep_local)
    ddp_model._lordo_allreduce_disabled = True
