"""What the benchmark scripts share: a steady allocator, interleaved timing, the training step
a bare loop takes, and where results are written.

glibc's malloc unmaps and remaps big freed tensors every iteration, which can make a
neighbouring measurement 10-60x slower; :func:`steady_malloc` re-executes the script with
that turned off. Import this module before torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks"

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


def joint_step(model: Any, optimizer: Any, x: Any, y: Any) -> None:
    """One joint training step of a mixture outside Lightning: task loss plus every MoE
    layer's aux losses, backward, optimiser step."""
    import torch.nn.functional as F

    log_probs, routings = model(x)
    loss = F.nll_loss(log_probs, y) + sum(sum(r.aux_losses.values()) for r in routings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def write_result(name: str, result: Any) -> Path:
    """``outputs/benchmarks/<name>.json``, printed where it went."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
