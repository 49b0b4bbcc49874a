"""moe-exp-report on real run folders."""

import json
import shutil

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
