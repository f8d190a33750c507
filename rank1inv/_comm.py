"""Communicators for operators whose gradients are sharded along d (docs/design.md §12).

Every reduction over d is a sum of per-shard partial results (an m-vector or an m×m matrix),
so an operator over shards needs three collectives, all on host float64 NumPy arrays:
``allreduce_sum``, ``allreduce_max`` and ``broadcast`` from rank 0. ``Communicator`` is that
protocol; ``TorchCommunicator`` wraps a torch.distributed process group (gloo; for an NCCL
group the small arrays travel as CUDA tensors on the current device, untested without a GPU),
``MPICommunicator`` an mpi4py communicator.
Both count the bytes each rank sends (``bytes_sent``), so the communication of a query can be
measured.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Communicator(Protocol):
    rank: int
    size: int
    bytes_sent: int

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks of a float64 array (same shape on every rank)."""

    def allreduce_max(self, a: np.ndarray) -> np.ndarray:
        """The elementwise maximum over ranks (nan if any rank has a nan)."""

    def broadcast(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's array, on every rank."""


class TorchCommunicator:
    """A torch.distributed process group (default: the world) as a ``Communicator``."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized (call init_process_group first)")
        self._dist, self._group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.bytes_sent = 0
        self._device = None  # host tensors (gloo, MPI backends of torch)
        if "nccl" in str(dist.get_backend(group)).lower():  # NCCL reduces CUDA tensors only
            import torch

            self._device = torch.device("cuda", torch.cuda.current_device())

    def _tensor(self, a):
        import torch

        t = torch.from_numpy(np.array(a, dtype=np.float64, copy=True))
        return t if self._device is None else t.to(self._device)

    @staticmethod
    def _host(t) -> np.ndarray:
        return t.cpu().numpy() if t.device.type != "cpu" else t.numpy()

    def _reduce(self, a, op):
        t = self._tensor(a)
        self.bytes_sent += t.numel() * 8
        self._dist.all_reduce(t, op=op, group=self._group)
        return self._host(t)

    def allreduce_sum(self, a):
        return self._reduce(a, self._dist.ReduceOp.SUM)

    def allreduce_max(self, a):
        return _max_keeping_nan(lambda v: self._reduce(v, self._dist.ReduceOp.MAX), a)

    def broadcast(self, a):
        t = self._tensor(a)
        self.bytes_sent += t.numel() * 8 if self.rank == 0 else 0
        self._dist.broadcast(t, src=self._dist.get_global_rank(self._group, 0) if self._group else 0, group=self._group)
        return self._host(t)


class MPICommunicator:
    """An mpi4py communicator as a ``Communicator``."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._comm, self._mpi = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.bytes_sent = 0

    def _reduce(self, a, op):
        a = np.ascontiguousarray(a, dtype=np.float64)
        out = np.empty_like(a)
        self.bytes_sent += a.nbytes
        self._comm.Allreduce(a, out, op=op)
        return out

    def allreduce_sum(self, a):
        return self._reduce(a, self._mpi.SUM)

    def allreduce_max(self, a):
        return _max_keeping_nan(lambda v: self._reduce(v, self._mpi.MAX), a)

    def broadcast(self, a):
        a = np.array(a, dtype=np.float64, copy=True)
        self.bytes_sent += a.nbytes if self.rank == 0 else 0
        self._comm.Bcast(a, root=0)
        return a


def _max_keeping_nan(reduce_max, a) -> np.ndarray:
    """The elementwise maximum over ranks by one MAX all-reduce (``reduce_max``) of the values
    (nan as +inf) and their nan flags side by side: nan where any rank has a nan."""
    a = np.asarray(a, dtype=np.float64)
    nan = np.isnan(a)
    both = reduce_max(np.concatenate([np.where(nan, np.inf, a).ravel(), nan.ravel().astype(np.float64)]))
    out, any_nan = both[: a.size].reshape(a.shape), both[a.size :].reshape(a.shape) > 0
    return np.where(any_nan, np.nan, out)


def same_on_every_rank(comm: Communicator, value: float) -> bool:
    """Whether every rank passed the same number (one all-reduce of 2 floats)."""
    top = comm.allreduce_max(np.array([value, -value], dtype=np.float64))
    return bool(top[0] == -top[1])


def rank_offsets(comm: Communicator, local: int) -> np.ndarray:
    """The first global coordinate of every rank and the total, from each rank's ``local``
    count: int64 (size + 1,), the same on every rank."""
    sizes = comm.allreduce_sum(np.eye(comm.size)[comm.rank] * local).astype(np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def as_communicator(comm) -> Communicator:
    """``comm`` as a Communicator: one already, an mpi4py communicator, a torch.distributed
    ProcessGroup, or "torch" for the default torch.distributed group."""
    if isinstance(comm, Communicator) and not isinstance(comm, type):
        return comm
    if isinstance(comm, str) and comm == "torch":
        return TorchCommunicator()
    module = type(comm).__module__
    if module.startswith("mpi4py"):
        return MPICommunicator(comm)
    if module.startswith("torch"):
        return TorchCommunicator(comm)
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process group or 'torch', not {comm!r}")
