"""``python -m moe_exp.analysis.reproduce [preset ...]`` (``make ablations``): run each ablation
preset's sweep, plus the extra sweeps its ``ablation.also`` lists (e.g. the dense baselines
beside an expert-count grid), into one folder, then write its report with the verdicts.

Each sweep is a plain ``moe-exp`` multirun in a subprocess, so a failing job is recorded by
the runner itself and the report lists it; nothing here trains or scores anything.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
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


def sweeps(preset: str, folder: Path, extra: Sequence[str] = ()) -> list[list[str]]:
    """The ``moe-exp`` argument lists for the preset's main sweep and its ``also`` sweeps."""
    from moe_exp.app.compose import compose

    also = compose([f"experiment={preset}"]).get("ablation", {}).get("also") or []
    main = [f"experiment={preset}", f"hydra.sweep.dir={folder}", *extra]
    return [main] + [
        [f"experiment={preset}", f"hydra.sweep.dir={folder / f'also{i}'}", *shlex.split(o), *extra]
        for i, o in enumerate(also)
    ]


def reproduce(preset: str, root: Path, extra: Sequence[str] = ()) -> Path:
    """Run one preset's sweeps and report; returns the folder holding runs and report."""
    from moe_exp.analysis.report import build_report, print_table

    folder = root / preset / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cli = str(Path(sys.executable).parent / "moe-exp")
    for args in sweeps(preset, folder, extra):
        print(f"$ moe-exp {' '.join(args)}", flush=True)
        if subprocess.run([cli, *args]).returncode != 0:
            print(f"{preset}: some jobs did not complete (the report lists them)", flush=True)
    table = build_report([folder], folder)
    print_table(table, f"{preset}: {table['runs']} runs")
    print(f"wrote {folder / 'report.md'}", flush=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_exp.analysis.reproduce", description=__doc__
    )
    known = presets()
    parser.add_argument("presets", nargs="*", default=known, help="default: all")
    parser.add_argument("--root", type=Path, default=Path("outputs/ablations"))
    parser.add_argument("--override", action="append", default=[], help="added to every sweep")
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in known]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for preset in args.presets:
        reproduce(preset, args.root, args.override)


if __name__ == "__main__":
    main()
