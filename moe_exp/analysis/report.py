"""``moe-exp-report``: compare run folders offline.

Reads every run folder (a folder holding ``summary.json``) under the given paths, derives the
swept parameters from the overrides that differ between runs, aggregates runs that differ
only by seed (mean ± std, n), and writes ``report.md``, ``report.csv`` (one row per group),
``runs.csv`` (one row per run) and plots of each metric against each swept parameter.
Failed, diverged and unfinished runs are listed with their status, never averaged in.

Runs made by an ablation preset (``experiment=ablation_*``) carry an ``ablation`` block in
their ``config.yaml``: its metrics become the columns, its published numbers a second table,
and its ``check`` (see :mod:`moe_exp.analysis.ablations`) the verdicts (holds / does not hold), also
written to ``verdicts.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_exp.analysis.verdicts import value_order

METRICS = (
    "test/acc",
    "val/acc",
    "test/cv_load",
    "test/max_mean_load",
    "test/max_vio",
    "test/dead_experts",
    "test/effective_experts",
    "test/nmi_label",
    "flops_active",
    "wall_time_s",
)
AGGREGATED_OVER = ("seed",)


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    params: dict[str, str]

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def metric(self, name: str) -> float | None:
        """A metric, or the mean over MoE layers (``test/layer0/cv_load`` ...) when per layer."""
        value = self.summary.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        split, _, rest = name.partition("/")
        layered = [
            v
            for k, v in self.summary.items()
            if k.startswith(f"{split}/layer") and k.endswith(f"/{rest}")
        ]
        return statistics.fmean(layered) if rest and layered else None


@dataclass
class Group:
    params: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    _values: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.status == "completed"]

    def status(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for r in self.runs:
            counts[r.status] += 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    @property
    def size(self) -> int:
        return len(self.completed)

    def values(self, metric: str) -> list[float]:
        """One value per completed run, nan where the run lacks the metric (remembered: the
        verdicts' seed redraws ask for the same values a thousand times)."""
        if metric not in self._values:
            runs = self.completed
            self._values[metric] = [
                math.nan if (v := r.metric(metric)) is None else v for r in runs
            ]
        return self._values[metric]

    def stats(self, metric: str) -> tuple[float, float, int]:
        values = [v for r in self.completed if (v := r.metric(metric)) is not None]
        if not values:
            return math.nan, math.nan, 0
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), std, len(values)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``["gate=topk", "+x=1", "hydra.foo=2"]`` → ``{"gate": "topk", "x": "1"}``."""
    params = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra."):
            params[key] = value
    return params


def find_runs(paths: Sequence[Path]) -> list[Run]:
    runs = []
    for root in paths:
        candidates = [root / "summary.json"] if (root / "summary.json").is_file() else []
        candidates += sorted(
            (p for p in root.rglob("summary.json") if p.parent != root), key=_natural_key
        )
        for summary_path in candidates:
            try:
                summary = json.loads(summary_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                summary = {"status": "unreadable", "error": str(err)}
            runs.append(
                Run(summary_path.parent, summary, parse_overrides(summary.get("overrides", [])))
            )
    return runs


def _natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sweep job folders in job order (2 before 10)."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(path)) if t]


def swept_parameters(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (seed excluded)."""
    keys = sorted({k for r in runs for k in r.params})
    return [
        k
        for k in keys
        if k not in AGGREGATED_OVER and len({r.params.get(k, "default") for r in runs}) > 1
    ]


def group_runs(runs: Sequence[Run], swept: Sequence[str]) -> list[Group]:
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = tuple(run.params.get(k, "default") for k in swept)
        groups.setdefault(key, Group(dict(zip(swept, key, strict=True)))).runs.append(run)
    return list(groups.values())


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "–"
    digits = 0 if abs(mean) >= 1000 else 4
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if n > 1 else text


def ablation_spec(runs: Sequence[Run]) -> dict[str, Any] | None:
    """The ``ablation`` block of the runs' saved config (the first run that has one)."""
    import yaml

    for run in runs:
        config = run.path / "config.yaml"
        if config.is_file():
            spec = (yaml.safe_load(config.read_text()) or {}).get("ablation")
            if spec:
                return spec
    return None


def build_report(
    paths: Sequence[Path],
    out_dir: Path,
    metrics: Sequence[str] | None = None,
    plots: bool = True,
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """Write report.md, report.csv, runs.csv and plots into ``out_dir``; return the table.

    ``metrics`` defaults to the ablation's own list, else :data:`METRICS`; with ``tags``
    only the runs that carry every one of them (``tags=[...]`` of the run) are reported."""
    runs = [r for r in find_runs(paths) if set(tags) <= set(r.summary.get("tags") or [])]
    if not runs:
        wanted = f" tagged {', '.join(tags)}" if tags else ""
        raise SystemExit(
            f"moe-exp-report: no run folders (summary.json){wanted} under {list(map(str, paths))}"
        )
    spec = ablation_spec(runs)
    metrics = list(metrics or (spec or {}).get("metrics") or METRICS)
    swept = swept_parameters(runs)
    groups = group_runs(runs, swept)
    verdicts, note = _verdicts(spec, groups) if spec else ([], "")
    # the parameter columns the table and plots show: an ablation may name the ones that
    # tell its cells apart (the others change with them), report.csv keeps them all
    shown = [k for k in (spec or {}).get("parameters") or swept if k in swept] or swept
    header = [*shown, *metrics, "n", "status"]
    stats = [{m: g.stats(m) for m in metrics} for g in groups]
    rows = []
    for g, by_metric in zip(groups, stats, strict=True):
        cells = [g.params[k] for k in shown]
        cells += [_fmt(*by_metric[m]) for m in metrics]
        cells += [str(len(g.completed)), g.status()]
        rows.append(cells)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_markdown(out_dir / "report.md", header, rows, runs, spec, verdicts, note)
    if spec:
        (out_dir / "verdicts.json").write_text(
            json.dumps(
                [{**asdict(v), "verdict": v.label, "uncertainty": v.uncertainty} for v in verdicts],
                indent=2,
            )
            + "\n"
        )
    with (out_dir / "report.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [*swept, *(f"{m} {s}" for m in metrics for s in ("mean", "std")), "n", "status"]
        )
        for g, by_metric in zip(groups, stats, strict=True):
            values = [v for m in metrics for v in by_metric[m][:2]]
            writer.writerow([*(g.params[k] for k in swept), *values, len(g.completed), g.status()])
    with (out_dir / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        keys = sorted({k for r in runs for k in r.params})
        writer.writerow(["path", "status", *keys, *metrics, "error"])
        for r in runs:
            writer.writerow(
                [
                    r.path,
                    r.status,
                    *(r.params.get(k, "") for k in keys),
                    *(r.metric(m) for m in metrics),
                    r.summary.get("error", ""),
                ]
            )
    plot_paths = _plots(groups, shown, metrics, out_dir / "plots") if plots else []
    return {
        "header": header,
        "rows": rows,
        "swept": swept,
        "runs": len(runs),
        "plots": plot_paths,
        "verdicts": verdicts,
    }


def _verdicts(spec: dict[str, Any], groups: list[Group]) -> tuple[list[Any], str]:
    """The preset's verdicts and a note: the check is one of the project's own, looked up by
    the name in its ``_target_`` (a results file names a check, it never brings code to
    run). A name that is not one of them, or arguments it does not take, give no verdicts
    and a one-line note instead."""
    from moe_exp.analysis.verdicts import Results, assess, known_checks

    node = dict(spec.get("check") or {})
    target = str(node.pop("_target_", ""))
    node.pop("_partial_", None)
    known = known_checks()
    if target not in known:
        return (
            [],
            f"no verdicts: ablation.check._target_={target!r} is not one of {', '.join(known)}",
        )
    try:
        return assess(known[target], Results(groups), **node), ""
    except TypeError as err:  # arguments the check does not take
        name = target.rpartition(".")[2]
        return [], f"no verdicts: ablation.check of {name} failed: {err}"


def _evidence(verdict: Any) -> str:
    return f"{verdict.evidence}; {verdict.uncertainty}" if verdict.uncertainty else verdict.evidence


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]


def _write_markdown(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    runs: list[Run],
    spec: dict[str, Any] | None = None,
    verdicts: Sequence[Any] = (),
    note: str = "",
) -> None:
    title = (spec or {}).get("title", "moe-exp report")
    lines = [f"# {title}", ""]
    if spec and spec.get("source"):
        lines += [f"Source: {spec['source']}", ""]
    if note:
        lines += [f"> {note}", ""]
    if verdicts:
        lines += ["## Verdicts", ""]
        lines += [f"- **{v.label}**: {v.claim}. {_evidence(v)}" for v in verdicts]
        lines += ["", "## Results (mean ± std over seeds)", ""]
    lines += _table(header, rows)
    published = (spec or {}).get("published")
    if published:
        lines += ["", "## Published", ""]
        lines += _table(published["header"], published["rows"])
    problems = [r for r in runs if r.status != "completed"]
    if problems:
        lines += ["", "## Runs that did not complete", ""]
        lines += [
            f"- `{r.path}`: **{r.status}** {r.summary.get('error', '')}".rstrip() for r in problems
        ]
    path.write_text("\n".join(lines) + "\n")


MAX_LINES = 12  # lines a report plot draws; beyond, it shows the mean over the other keys


def _plots(groups: list[Group], swept: list[str], metrics: Sequence[str], out: Path) -> list[Path]:
    """A metric against each swept parameter, a line per combination of the others (up to
    ``MAX_LINES``): averaged over them, a plot would mix arms that the table keeps apart
    (compute_scaling's samples/s of the sparse and the dense-all gates in one point)."""
    from moe_exp.measure.plots import metric_vs_parameter

    paths = []
    for parameter in swept:
        others = [p for p in swept if p != parameter]
        labels = [  # a key by its last part (data.train_fraction: train_fraction)
            ", ".join(f"{p.rpartition('.')[2]}={g.params[p]}" for p in others) for g in groups
        ]
        if len(set(labels)) > MAX_LINES:
            labels = [f"mean over {', '.join(others)}"] * len(groups)
        lines: dict[str, dict[str, Group]] = defaultdict(lambda: defaultdict(lambda: Group({})))
        for g, label in zip(groups, labels, strict=True):
            lines[label][g.params[parameter]].runs += g.runs
        xs = sorted({x for by_value in lines.values() for x in by_value}, key=value_order)
        for metric in metrics:
            points = {}
            for label, by_value in lines.items():
                stats = {x: g.stats(metric) for x, g in by_value.items()}
                kept = {x: (mean, std) for x, (mean, std, n) in stats.items() if n}
                if kept:
                    points[label] = kept
            if not points:
                continue
            name = f"{metric.replace('/', '_')}_vs_{parameter.replace('/', '_')}.png"
            paths.append(metric_vs_parameter(xs, points, metric, parameter, out / name))
    return paths


def print_table(table: dict[str, Any], title: str) -> None:
    """The table in the terminal, then each ablation verdict on a line of its own."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # cells as plain Text: a value like [0.1,0.1] or [new,gate] is not rich markup
    rich_table = Table(title=Text(title))
    for column in table["header"]:
        rich_table.add_column(Text(column), overflow="fold")
    for cells in table["rows"]:
        style = None if cells[-1].endswith("completed") and "," not in cells[-1] else "red"
        rich_table.add_row(*map(Text, cells), style=style)
    Console(width=max(120, 14 * len(table["header"]))).print(rich_table)
    for v in table["verdicts"]:
        print(f"{v.label.upper()}: {v.claim}. {_evidence(v)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moe-exp-report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the first path)")
    parser.add_argument(
        "--metrics", nargs="+", help="columns to show (default: the ablation's, else the usual)"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--tag", action="append", default=[], help="only runs with this tag (repeatable)"
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    out = args.out or args.paths[0]
    table = build_report(args.paths, out, args.metrics, plots=not args.no_plots, tags=args.tag)
    print_table(table, f"{table['runs']} runs; swept: {', '.join(table['swept']) or 'nothing'}")
    print(
        f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'runs.csv'}"
        f" and {len(table['plots'])} plots"
    )


if __name__ == "__main__":
    main()
