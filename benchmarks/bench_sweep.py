"""Wall time of one 8-job sweep (experiment=quick, seeds 0-7) on this machine, by launcher.

Prints a table and writes outputs/benchmarks/sweep.json. Variants, run in turn:
- ``basic``: Hydra's default launcher, one job after another, each with ``threads`` (2) torch
  threads;
- ``basic-1thread``: the same with threads=1 (separates the launcher from the threading);
- ``joblib``: ``hydra/launcher=joblib`` (n_jobs=-1: one job per CPU, each capped at its share
  of the CPUs by moe-exp).

The sweep's wall time includes Python and torch start-up of every job (basic: once; joblib:
once per worker) and is what a user waits for. On a shared machine the numbers are noisy:
run with --repeats > 1 and read the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "moe-exp")
VARIANTS = {
    "basic": [],
    "basic-1thread": ["threads=1"],
    "joblib": ["hydra/launcher=joblib"],
}


def sweep(extra: list[str], jobs: int) -> dict:
    """One sweep in a scratch folder: its wall time and what its jobs recorded."""
    seeds = ",".join(str(s) for s in range(jobs))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = subprocess.run(
            [CLI, "-m", "experiment=quick", f"seed={seeds}", *extra],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"moe-exp failed:\n{out.stderr[-3000:]}")
        runs = [
            json.loads(p.read_text())
            for p in Path(tmp).glob("outputs/multiruns/*/*/*/summary.json")
        ]
    runs = [r for r in runs if "status" in r]
    return {
        "wall_s": round(wall, 2),
        "jobs": len(runs),
        "completed": sum(r["status"] == "completed" for r in runs),
        "threads": sorted({r.get("threads") for r in runs}),
        "job_wall_median_s": round(statistics.median(r["wall_time_s"] for r in runs), 2),
        "test_acc_mean": round(statistics.mean(r["test/acc"] for r in runs), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so slow phases of the machine hit all
        for name, extra in VARIANTS.items():
            results[name].append(sweep(extra, args.jobs))
            print(f"{name:14s} {results[name][-1]}", flush=True)

    summary = {
        name: {
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "runs": runs,
        }
        for name, runs in results.items()
    }
    base = summary["basic"]["wall_s_median"]
    print(f"\n{args.jobs}-job sweep, experiment=quick, {os.cpu_count()} CPUs")
    print(f"{'launcher':14s} {'wall s':>8s} {'speed-up':>9s} {'threads/job':>12s}")
    for name, row in summary.items():
        threads = ",".join(str(t) for t in row["runs"][-1]["threads"])
        speedup = base / row["wall_s_median"]
        print(f"{name:14s} {row['wall_s_median']:8.1f} {speedup:8.2f}x {threads:>12s}")

    out = ROOT / "outputs" / "benchmarks" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    out.write_text(json.dumps({"jobs": args.jobs, "machine": machine, **summary}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
