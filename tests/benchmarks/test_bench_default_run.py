"""make bench's throughput part runs on a small config, so it cannot rot: every Lightning
step but the last is paired with a bare step, and the fixed costs are measured."""

import importlib.util
import math
import sys
from pathlib import Path

from tests.conftest import TINY

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_paired_steps_pair_every_lightning_step_with_a_bare_one(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling timing.py
    spec = importlib.util.spec_from_file_location(
        "bench_default_run", BENCHMARKS / "bench_default_run.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    overrides = (*TINY, "data.batch_size=32")  # 256 images: 8 steps
    result = bench.throughput(2, overrides)
    assert result["pairs"] == 2 * (8 - 2)  # per round: the first (warm-up) and last left out
    assert all(s > 0 for s in result["fixed_s_per_fit"])
    assert 0 < result["ratio"] < 5 and math.isfinite(result["overhead_ms"])
    assert len(result["epoch_ratios"]) == 2
    sys.modules.pop("timing", None)
