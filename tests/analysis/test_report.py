"""moe-exp-report on real run folders."""

import json
import shutil

import pytest

from moe_exp.analysis.report import (
    build_report,
    find_runs,
    main,
    parse_overrides,
    print_table,
    swept_parameters,
)


def test_overrides_parse_into_parameters():
    assert parse_overrides(["gate=topk", "+x=1", "hydra.verbose=true", "seed=3"]) == {
        "gate": "topk",
        "x": "1",
        "seed": "3",
    }


def test_report_on_a_real_2x2_multirun(quick_sweep, tmp_path, capsys):
    main([str(quick_sweep), "--out", str(tmp_path)])  # the console script's main()
    printed = capsys.readouterr().out
    assert "swept: gate" in printed and "noisy_topk" in printed
    md = (tmp_path / "report.md").read_text()
    # seeds are aggregated: one row per gate, n = 2, mean ± std
    rows = [
        line
        for line in md.splitlines()
        if line.startswith("| topk") or line.startswith("| noisy_topk")
    ]
    assert len(rows) == 2 and all("± " in r and "| 2 | 2 completed |" in r for r in rows)
    runs = find_runs([quick_sweep])
    accs = [r.summary["test/acc"] for r in runs if r.params["gate"] == "topk"]
    header = (tmp_path / "report.csv").read_text().splitlines()
    topk = next(line for line in header if line.startswith("topk,"))
    assert float(topk.split(",")[1]) == sum(accs) / 2
    plots = list((tmp_path / "plots").glob("*.png"))
    assert any(p.name == "test_acc_vs_gate.png" for p in plots)
    assert all(p.stat().st_size > 1000 for p in plots)


def test_failed_and_unfinished_runs_are_shown_never_averaged(quick_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(quick_sweep, sweep)
    failed = sweep / "0" / "summary.json"
    data = json.loads(failed.read_text())
    data.update(status="failed", error="RuntimeError: boom")
    failed.write_text(json.dumps(data))
    running = sweep / "2" / "summary.json"
    overrides = json.loads(running.read_text())["overrides"]
    running.write_text(json.dumps({"status": "running", "overrides": overrides}))
    table = build_report([sweep], tmp_path / "out", plots=False)
    statuses = [row[-1] for row in table["rows"]]
    assert sorted(statuses) == ["1 completed, 1 failed", "1 completed, 1 running"]
    assert sum(int(row[-2]) for row in table["rows"]) == 2  # only completed runs counted
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**failed** RuntimeError: boom" in md and "**running**" in md


def test_only_differing_overrides_become_columns(quick_sweep):
    runs = find_runs([quick_sweep])
    assert swept_parameters(runs) == ["gate"]  # seed is aggregated, experiment=quick is fixed


def test_plot_axes_put_numbers_in_order_and_other_values_after():
    from moe_exp.analysis.verdicts import value_order

    assert sorted(["8", "default", "2", "16"], key=value_order) == ["2", "8", "16", "default"]


def test_the_terminal_table_prints_list_values_as_they_are(capsys):
    """A swept value like [0.1,0.1] or [new,gate] looks like rich markup; it must print."""
    table = {
        "header": ["balance_weights", "surgery.train", "n", "status"],
        "rows": [["[0.1,0.1]", "[new,gate]", "2", "2 completed"]],
        "verdicts": [],
    }
    print_table(table, "grid [a]")
    out = capsys.readouterr().out
    assert "[0.1,0.1]" in out and "[new,gate]" in out and "grid [a]" in out


def test_a_report_plot_draws_a_line_per_arm_never_their_mean(tmp_path, monkeypatch):
    """With two keys swept, a metric against one of them is a line per value of the other
    (each point a cell's mean over seeds): averaged, compute_scaling's sparse and dense-all
    throughputs would read as one number."""
    import moe_exp.measure.plots as plots
    from moe_exp.analysis import report

    drawn = {}

    def draw(xs, lines, metric, parameter, path):
        drawn[metric, parameter] = (xs, lines)
        return path

    monkeypatch.setattr(plots, "metric_vs_parameter", draw)
    for gate, speed in (("sparse", 100.0), ("dense", 10.0)):
        for e in ("2", "8"):
            for seed in ("0", "1"):
                folder = tmp_path / f"{gate}-{e}-{seed}"
                folder.mkdir()
                overrides = [f"gate={gate}", f"experts={e}", f"seed={seed}"]
                summary = {
                    "overrides": overrides,
                    "status": "completed",
                    "speed": speed + int(seed),
                }
                (folder / "summary.json").write_text(json.dumps(summary))
    runs = find_runs([tmp_path])
    groups = report.group_runs(runs, ["experts", "gate"])
    report._plots(groups, ["experts", "gate"], ["speed"], tmp_path / "plots")
    xs, lines = drawn["speed", "experts"]
    assert xs == ["2", "8"] and set(lines) == {"gate=sparse", "gate=dense"}
    assert lines["gate=sparse"]["8"] == (100.5, pytest.approx(0.7071, abs=1e-4))
    assert lines["gate=dense"]["2"][0] == 10.5
    # too many arms for one plot: the mean over them, and the title of the line says so
    monkeypatch.setattr(report, "MAX_LINES", 1)
    report._plots(groups, ["experts", "gate"], ["speed"], tmp_path / "plots")
    (label,) = drawn["speed", "experts"][1]
    assert label == "mean over gate"
