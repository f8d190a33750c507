"""Block-diagonal layouts: which coordinates form a block, grouped into runs of equal size.

A layout is a list of *runs*: ``(start, count, size)`` means ``count`` consecutive blocks of
``size`` coordinates starting at ``start``. Each run is processed as one batch, so equal-sized
blocks never cost a Python loop per block.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _backend


@dataclass(frozen=True)
class Run:
    start: int
    count: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size


class Layout:
    """Block structure over ``dim`` coordinates; ``block_size`` as in StaticInverse.

    ``keys`` (one value per block, e.g. its damping) keeps blocks with different keys in
    different runs; ``run_keys[i]`` is the key of run i (None without keys)."""

    def __init__(self, dim: int, block_size=None, keys=None):
        self.dim = dim
        sizes = self._sizes(dim, block_size)
        if keys is not None and len(keys) != len(sizes):
            raise ValueError(f"expected one value per block ({len(sizes)} blocks), got {len(keys)}")
        self.runs: list[Run] = []
        self.run_keys: list = []
        start = 0
        for i, size in enumerate(sizes):
            key = None if keys is None else keys[i]
            last = self.runs[-1] if self.runs else None
            if last is not None and last.size == size and self.run_keys[-1] == key:
                self.runs[-1] = Run(last.start, last.count + 1, size)
            else:
                self.runs.append(Run(start, 1, size))
                self.run_keys.append(key)
            start += size
        self.block_sizes = tuple(sizes)
        # run_starts[i] is the first coordinate of run i (host copy, for index mapping)
        self.run_starts = np.array([r.start for r in self.runs], dtype=np.int64)

    @staticmethod
    def _sizes(dim: int, block_size) -> list[int]:
        if block_size is None:
            return [dim]
        if isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool):
            b = int(block_size)
            if b < 1:
                raise ValueError(f"block_size must be >= 1, got {b}")
            b = min(b, dim)
            full, rest = divmod(dim, b)
            return [b] * full + ([rest] if rest else [])
        try:
            items = list(block_size)
        except TypeError as err:
            raise TypeError("block_size must be None, an int, or a sequence of ints") from err
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in items):
            raise TypeError("block_size sequence must hold ints")
        sizes = [int(s) for s in items]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError("block_size sequence must be non-empty with every length >= 1")
        if sum(sizes) != dim:
            raise ValueError(f"block lengths sum to {sum(sizes)}, but the dimension is {dim}")
        return sizes

    def locate(self, xp, idx):
        """For global indices: (run id, offset inside the run, block id inside the run)."""
        starts = xp.asarray(self.run_starts, device=_backend.device(idx))
        run = xp.searchsorted(starts, idx, side="right") - 1
        sizes = xp.asarray(np.array([r.size for r in self.runs], dtype=np.int64), device=_backend.device(idx))
        offset = idx - xp.take(starts, run)
        block = offset // xp.take(sizes, run)
        return run, offset, block
