"""Communicators for operators whose gradients are sharded along d (docs/design.md §12).

Every reduction over d is a sum of per-shard partial results (an m-vector or an m×m matrix),
so an operator over shards needs three collectives, all on host float64 NumPy arrays:
``allreduce_sum``, ``allreduce_max`` and ``broadcast`` from rank 0. ``Communicator`` is that
protocol; ``TorchCommunicator`` wraps a torch.distributed process group (gloo; for an NCCL
group the small arrays travel as CUDA tensors on the current device, untested without a GPU),
``MPICommunicator`` an mpi4py communicator.
Both count the bytes each rank sends (``bytes_sent``), so the communication of a query can be
measured.

Every collective entry point of a sharded operator agrees on success before anything is
committed (docs/design.md §12): each rank validates its own inputs, then one reduction carries an
"I refused" flag (and the values that must be equal on every rank) with the first collective the
call needs (``agreed_max``) or, where that collective's size depends on the inputs, on its own
(``agreement``). A rank that refused raises its own error, every other rank a ``Refused``; no
rank goes on to a collective the others skip, and none commits alone.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Communicator(Protocol):
    rank: int
    size: int
    bytes_sent: int  # what this rank sent, in all
    collectives: int  # how many collective calls this rank made

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks of a float64 array (same shape on every rank)."""

    def allreduce_max(self, a: np.ndarray) -> np.ndarray:
        """The elementwise maximum over ranks (nan if any rank has a nan)."""

    def allreduce_max_finite(self, a: np.ndarray) -> np.ndarray:
        """The elementwise maximum over ranks of finite values (one plain MAX reduction)."""

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
        self.collectives = 0
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
        self.collectives += 1
        self._dist.all_reduce(t, op=op, group=self._group)
        return self._host(t)

    def allreduce_sum(self, a):
        return self._reduce(a, self._dist.ReduceOp.SUM)

    def allreduce_max(self, a):
        return _max_keeping_nan(self.allreduce_max_finite, a)

    def allreduce_max_finite(self, a):
        return self._reduce(a, self._dist.ReduceOp.MAX)

    def broadcast(self, a):
        t = self._tensor(a)
        self.bytes_sent += t.numel() * 8 if self.rank == 0 else 0
        self.collectives += 1
        self._dist.broadcast(t, src=self._dist.get_global_rank(self._group, 0) if self._group else 0, group=self._group)
        return self._host(t)


class MPICommunicator:
    """An mpi4py communicator as a ``Communicator``."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._comm, self._mpi = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.bytes_sent = 0
        self.collectives = 0

    def _reduce(self, a, op):
        a = np.ascontiguousarray(a, dtype=np.float64)
        out = np.empty_like(a)
        self.bytes_sent += a.nbytes
        self.collectives += 1
        self._comm.Allreduce(a, out, op=op)
        return out

    def allreduce_sum(self, a):
        return self._reduce(a, self._mpi.SUM)

    def allreduce_max(self, a):
        return _max_keeping_nan(self.allreduce_max_finite, a)

    def allreduce_max_finite(self, a):
        return self._reduce(a, self._mpi.MAX)

    def broadcast(self, a):
        a = np.array(a, dtype=np.float64, copy=True)
        self.bytes_sent += a.nbytes if self.rank == 0 else 0
        self.collectives += 1
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


class Refused(ValueError):
    """Another rank refused a collective call (its own error names the reason)."""


def _encode(failed: bool, rank: int, checks) -> np.ndarray:
    """[failed rank + 1 (0: none), c₁, −c₁, c₂, −c₂, ...]: under MAX, equal checks come back as
    c and −c."""
    c = np.asarray([float(v) for v in checks], dtype=np.float64)
    return np.concatenate([[float(rank + 1) if failed else 0.0], np.stack([c, -c], axis=1).reshape(-1)])


MESSAGE_BYTES = 240  # of a refusing rank's error text sent to the others (only when a call is refused)


def _decode(out, err, what: str, names, comm=None) -> None:
    """Raise on every rank as the reduced [flag, ±checks] ask: the local error, a Refused naming
    the rank that refused and its reason, or a ValueError for checks that differ across ranks.
    When a rank refused, one more reduction carries its message to the others."""
    if out[0] > 0:
        culprit = int(out[0]) - 1
        text = ""
        if comm is not None:
            mine = np.zeros(MESSAGE_BYTES)
            if err is not None and comm.rank == culprit:
                raw = f"{type(err).__name__}: {err}".encode()[:MESSAGE_BYTES]
                mine[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            got = comm.allreduce_max_finite(mine).astype(np.uint8)
            text = bytes(got[got > 0]).decode(errors="replace")
        if err is not None:
            raise err
        raise Refused(f"rank {culprit} refused this {what}, so no rank applied it: {text}")
    if err is not None:
        raise err
    pairs = out[1:].reshape(-1, 2)
    differ = [n for n, (hi, neg_lo) in zip(names, pairs) if hi != -neg_lo]
    differ = list(dict.fromkeys(re.sub(r"_\d+$", "", n).replace("_", " ") for n in differ))  # parts of one name
    if differ:
        raise ValueError(f"every rank must pass the same {', '.join(differ)} to this {what}; they differ")


class agreement:
    """``with agreement(comm, "product", "columns") as a: <local validation>; a.set(columns=k)``:
    on exit one MAX all-reduce of the "I refused" flag and the named values (1 + 2 floats per
    name; the names are fixed up front, so the size is the same on every rank whatever the
    inputs), then every rank raises if any refused or a value differs (docs/design.md §12). With
    ``comm`` None it only re-raises. Exceptions of the body other than TypeError, ValueError,
    IndexError and OverflowError propagate without the collective (a bug, not a refusal)."""

    def __init__(self, comm, what: str, *names: str):
        self.comm, self.what, self.names = comm, what, names
        self.values = dict.fromkeys(names, 0.0)

    def __enter__(self):
        return self

    def set(self, **values) -> None:
        """Values that must be equal on every rank (numbers), among the declared names."""
        self.values.update(values)

    def __exit__(self, kind, err, tb):
        if self.comm is None:
            return False
        if err is not None and not isinstance(err, (TypeError, ValueError, IndexError, OverflowError)):
            return False
        failed = err is not None
        checks = [0.0] * len(self.names) if failed else [self.values[n] for n in self.names]
        out = self.comm.allreduce_max_finite(_encode(failed, self.comm.rank, checks))
        _decode(out, err, self.what, self.names, self.comm)
        return False


def agreed_max(comm, values, err, what: str = "call", finite: bool = False, **checks) -> np.ndarray:
    """The elementwise max over ranks of ``values`` (float64, a fixed size on every rank; nan where
    any rank has a nan), in one MAX all-reduce that also carries the agreement of ``agreement``:
    ``err`` is this rank's validation error (or None; then its ``values`` may be anything of the
    right size). ``finite``: the values are known finite (no nan flags travel). Raises as
    ``agreement`` does."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if comm is None:
        if err is not None:
            raise err
        return a
    failed = err is not None
    head = _encode(failed, comm.rank, [0.0] * len(checks) if failed else checks.values())
    if finite:
        both = comm.allreduce_max_finite(np.concatenate([head, np.where(np.isfinite(a), a, 0.0)]))
        _decode(both[: head.size], err, what, list(checks), comm)
        return both[head.size :]
    nan = np.isnan(a)
    both = comm.allreduce_max_finite(np.concatenate([head, np.where(nan, np.inf, a), nan.astype(np.float64)]))
    _decode(both[: head.size], err, what, list(checks), comm)
    out, any_nan = both[head.size : head.size + a.size], both[head.size + a.size :] > 0
    return np.where(any_nan, np.nan, out)


def digest(*parts) -> tuple[float, float]:
    """Two exact floats (48 bits each of a SHA-256) of arrays and scalars, for agreement checks
    of inputs too long to send (index lists, replicated state)."""
    h = hashlib.sha256()
    for part in parts:
        a = np.asarray(part)
        if a.dtype.kind in "fiub":
            h.update(np.ascontiguousarray(a.astype(np.float64 if a.dtype.kind == "f" else np.int64)).tobytes())
        else:
            h.update(repr(a.tolist()).encode())
        h.update(b"|")
    raw = h.digest()
    return float(int.from_bytes(raw[:6], "big")), float(int.from_bytes(raw[6:12], "big"))


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
