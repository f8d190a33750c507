"""Progress of the long commands (the demo, ``python -m benchmarks``, the experiments) on stderr,
so that their tables on stdout stay clean: a bar redrawn in place when stderr is a terminal, one
line per stage otherwise (a log file, CI). Silent unless a command opened ``reporting()``: the
library never prints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

T = TypeVar("T")

BAR_WIDTH = 24


class Progress:
    """Elapsed-time progress lines on ``stream`` (default stderr)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start = time.perf_counter()
        self._open_line = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            if final:
                self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, label: str) -> None:
        """One stage done (or started): ``[  12.3 s] label``."""
        self._write(f"[{self.elapsed():7.1f} s] {label}", final=True)

    def track(self, items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
        """``items`` one by one; a bar with count, elapsed and remaining time on a terminal, a line
        when the loop starts and one when it ends otherwise."""
        if total is None:
            total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        begun = time.perf_counter()
        if not self.tty:
            self.step(f"{label} ({total} runs) ..." if total else f"{label} ...")
        done = 0
        for item in items:
            if self.tty:
                self._write(self._bar(label, done, total, time.perf_counter() - begun), final=False)
            yield item
            done += 1
        took = time.perf_counter() - begun
        self._write(f"[{self.elapsed():7.1f} s] {label}: {done} runs in {took:.1f} s", final=True)

    def _bar(self, label: str, done: int, total: int | None, took: float) -> str:
        head = f"[{self.elapsed():7.1f} s] {label}"
        if not total:
            return f"{head} {done} runs"
        filled = BAR_WIDTH * done // total
        left = f", ~{took / done * (total - done):.0f} s left" if done else ""
        return f"{head} |{'#' * filled}{' ' * (BAR_WIDTH - filled)}| {done}/{total}{left}"

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


_ACTIVE: list[Progress] = []


@contextmanager
def reporting(stream: TextIO | None = None) -> Iterator[Progress]:
    """Report the progress of everything run inside (a command's ``main``)."""
    progress = Progress(stream)
    _ACTIVE.append(progress)
    try:
        yield progress
    finally:
        _ACTIVE.remove(progress)
        progress.close()


def step(label: str) -> None:
    """A stage line on the innermost ``reporting()``; nothing outside one."""
    if _ACTIVE:
        _ACTIVE[-1].step(label)


def track(items: Iterable[T], label: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a progress bar on the innermost ``reporting()``; unchanged outside one."""
    return _ACTIVE[-1].track(items, label, total) if _ACTIVE else items
