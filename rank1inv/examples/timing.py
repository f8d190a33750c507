"""Timing that survives a noisy machine: medians of repeated ratios (docs/design.md §9)."""

from __future__ import annotations

import statistics
import time

from .. import _backend


class Timer:
    """Median wall time of ``fn`` on a backend (synchronising the GPU around each call)."""

    def __init__(self, xp, repeat: int = 5, pause: float | None = None):
        self.xp, self.repeat = xp, repeat
        self.pause = SPIN_PAUSE if pause is None else pause

    def _sync(self):
        if _backend.is_cupy(self.xp):
            import cupy

            cupy.cuda.Device().synchronize()

    def _once(self, fn) -> float:
        t0 = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - t0

    def __call__(self, fn, repeat: int | None = None) -> float:
        fn()
        self._sync()
        return statistics.median(self._once(fn) for _ in range(repeat or self.repeat))

    def ratio(self, fn, reference, repeat: int | None = None) -> tuple[float, float, float]:
        """The median round of ``rounds``: (time(fn)/time(reference), time(fn), time(reference))."""
        rounds = self.rounds(fn, reference, repeat)
        return rounds[len(rounds) // 2]

    def rounds(self, fn, reference, repeat: int | None = None) -> list[tuple[float, float, float]]:
        """Every round's (time(fn)/time(reference), time(fn), time(reference)), sorted by the
        ratio. Each round times a block of ``reference`` calls, then a block of ``fn`` calls,
        with a pause of ``SPIN_PAUSE`` before each block: multi-threaded OpenBLAS keeps its idle
        workers spinning for a while after a call (measured here: more than 0.15 s, less than
        0.5 s), and whatever runs next would share the cores with them (on 2 vCPUs our compiled
        passes then take up to 1.7× as long). After the pause each block first warms up
        (``_warm``): a VM's idle cores come back slowly, and the first calls after a pause are
        up to 2× slower than the steady ones (docs/benchmarks.md). Rounds make the ratio robust
        to a machine whose speed drifts during the run."""
        fn()
        reference()
        self._sync()
        rounds = []
        for _ in range(max(3, (repeat or self.repeat) // 3)):
            time.sleep(self.pause)
            self._warm(reference)
            b = statistics.median(self._once(reference) for _ in range(3))
            time.sleep(self.pause)
            self._warm(fn)
            a = statistics.median(self._once(fn) for _ in range(3))
            rounds.append((a / b, a, b))
        rounds.sort()
        return rounds

    def paired(self, fn, reference, pairs: int = 40) -> tuple[float, float, float, float, float]:
        """Adjacent calls in pairs, the order alternating: (median, lower and upper quartile of
        time(fn)/time(reference) over the pairs, median time(fn), median time(reference)). For
        two functions of similar cost on a machine whose memory speed drifts within seconds:
        adjacent calls see the same phase, blocks of calls need not (docs/benchmarks.md)."""
        fn()
        reference()
        self._sync()
        ratios, a_times, b_times = [], [], []
        for i in range(pairs):
            if i % 2:
                a, b = self._once(fn), self._once(reference)
            else:
                b, a = self._once(reference), self._once(fn)
            ratios.append(a / b)
            a_times.append(a)
            b_times.append(b)
        q25, q50, q75 = statistics.quantiles(ratios, n=4) if pairs > 1 else (ratios[0],) * 3
        return q50, q25, q75, statistics.median(a_times), statistics.median(b_times)

    def _warm(self, fn) -> None:
        """Untimed calls until ``WARM_UP`` seconds have passed (at least one, at most
        ``WARM_UP_CALLS``: each push_apply call consumes a fresh gradient)."""
        start = time.perf_counter()
        for _ in range(WARM_UP_CALLS):
            self._once(fn)
            if time.perf_counter() - start >= WARM_UP:
                break


SPIN_PAUSE = 0.5  # seconds: longer than OpenBLAS's spin-wait before its workers sleep (0.15 s was not, measured)
WARM_UP = 0.1  # seconds of untimed calls after each pause (the slow first calls last ~5 push_apply at m = 1024)
WARM_UP_CALLS = 8
