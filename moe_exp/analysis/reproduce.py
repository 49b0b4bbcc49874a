"""``python -m moe_exp.analysis.reproduce [preset ...]`` (``make ablations``): run each ablation
preset's sweep, plus the extra sweeps its ``ablation.also`` lists (e.g. the dense baselines
beside an expert-count grid, or a later phase that starts from the main sweep's runs), in
order, into one folder, then write its report with the verdicts.

Each sweep is a plain ``moe-exp`` multirun in a subprocess, so a failing job is recorded by
the runner itself and the report lists it; nothing here trains or scores anything. The jobs of
a sweep run side by side (``hydra/launcher=parallel``, ``--jobs``), each with its share of the
CPUs: most of the presets' models are too small to keep two threads busy, so two one-thread
jobs side by side finish sooner than two two-thread jobs in turn (``--jobs 1`` for a grid of
wide models, which do scale with threads). A run's own pictures are skipped
(``plots=false``) unless the preset's ``ablation.plots`` asks for them: the verdicts read only
the summaries, and the report draws its own plots.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path


def presets() -> list[str]:
    """The experiment presets that carry an ``ablation`` block (conf/experiment/*.yaml)."""
    from moe_exp.app.compose import config_dir

    folder = Path(config_dir()) / "experiment"
    return sorted(
        p.stem for p in folder.glob("*.yaml") if re.search(r"^ablation:", p.read_text(), re.M)
    )


def sweeps(preset: str, folder: Path, extra: Sequence[str] = (), jobs: int = 1) -> list[list[str]]:
    """The ``moe-exp`` argument lists for the preset's main sweep and its ``also`` sweeps,
    ``jobs`` at a time, or fewer where the preset's ``ablation.jobs`` says so (a claim on
    training speed needs each run alone on the machine: side by side, a job's speed
    depends on what its neighbour is doing)."""
    from moe_exp.app.compose import compose

    ablation = compose([f"experiment={preset}"]).get("ablation", {})
    jobs = min(jobs, ablation.get("jobs") or jobs)
    also = ablation.get("also") or []
    launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    pictures = [] if ablation.get("plots") else ["plots=false"]
    extra = [*launcher, *pictures, *extra]  # the user's own overrides last, so they win
    main = [f"experiment={preset}", f"hydra.sweep.dir={folder}", *extra]
    # ``{sweep}`` in an ``also`` sweep names the preset's folder (a later phase starting
    # from the main sweep's runs, e.g. surgery.init_from={sweep}/<run>)
    return [main] + [
        [
            f"experiment={preset}",
            f"hydra.sweep.dir={folder / f'also{i}'}",
            *shlex.split(o.replace("{sweep}", shlex.quote(str(folder)))),
            *extra,
        ]
        for i, o in enumerate(also)
    ]


def reproduce(preset: str, root: Path, extra: Sequence[str] = (), jobs: int = 1) -> Path:
    """Run one preset's sweeps and report; returns the folder holding runs and report."""
    from moe_exp.analysis.report import build_report, print_table

    folder = root / preset / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cli = str(Path(sys.executable).parent / "moe-exp")
    for args in sweeps(preset, folder, extra, jobs):
        print(f"$ moe-exp {' '.join(args)}", flush=True)
        if subprocess.run([cli, *args]).returncode != 0:
            print(f"{preset}: some jobs did not complete (the report lists them)", flush=True)
    table = build_report([folder], folder)
    print_table(table, f"{preset}: {table['runs']} runs")
    print(f"wrote {folder / 'report.md'}", flush=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    from moe_exp.app.cli import cpu_count

    parser = argparse.ArgumentParser(
        prog="python -m moe_exp.analysis.reproduce", description=__doc__
    )
    known = presets()
    parser.add_argument("presets", nargs="*", default=known, help="default: all")
    parser.add_argument("--root", type=Path, default=Path("outputs/ablations"))
    parser.add_argument("--override", action="append", default=[], help="added to every sweep")
    parser.add_argument(
        "--jobs", type=int, default=cpu_count(), help="jobs at once (default: one per CPU)"
    )
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in known]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: needs at least 1")
    walls = {}
    for preset in args.presets:
        start = time.perf_counter()
        reproduce(preset, args.root, args.override, args.jobs)
        walls[preset] = time.perf_counter() - start
    for preset, wall in walls.items():
        print(f"{preset}: {wall / 60:.1f} min", flush=True)
    print(f"all {len(walls)} preset(s): {sum(walls.values()) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
