"""What the benchmark scripts share: a steady allocator and interleaved timing.

glibc's malloc unmaps and remaps big freed tensors every iteration, which can make a
neighbouring measurement 10-60x slower; :func:`steady_malloc` re-executes the script with
that turned off. Import this module before torch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def steady_malloc() -> None:
    """Re-execute the running script with ``MALLOC_ENV`` unless it is already set."""
    if any(os.environ.get(k) is None for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Run the callables in turn (A B A B ...) and return each one's timed seconds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return times
