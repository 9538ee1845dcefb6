"""One timer/logger and one seed scheme for every command and the pipeline."""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Timer", "sub_seed", "is_main_process"]


def is_main_process() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` launch (they print nothing)."""
    import os

    try:
        world, rank = int(os.environ.get("WORLD_SIZE") or 1), int(os.environ.get("RANK") or 0)
    except ValueError:
        return True
    return world <= 1 or rank == 0


def sub_seed(seed: int, purpose: str, index: int = 0) -> int:
    """Deterministic seed for one purpose of a run (``"split"``, ``"pairs"``, ``"null"``, ...).

    Every random choice of a run derives from the run's ``seed`` through this function, so
    stages stay reproducible and independent of each other (changing one stage's draws does
    not shift another's).
    """
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode()) * 7919 + int(index)) % (2**31 - 1)


@dataclass
class Timer:
    """Wall-clock seconds per named phase, plus ``[name] message`` progress lines.

    >>> timer = Timer("run", quiet=True)
    >>> with timer.phase("scan"):
    ...     pass
    >>> sorted(timer.seconds)
    ['scan']
    """

    name: str
    quiet: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)
