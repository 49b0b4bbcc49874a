"""The real `moe-exp` console script, run as a subprocess."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICK, TINY_DATA, run_app, single_run_dir, single_sweep_dir

METRIC_KEYS = (
    "test/acc",
    "test/loss",
    "val/acc",
    "test/cv_load",
    "test/cv_importance",
    "test/max_mean_load",
    "test/load_entropy",
    "test/load_e0",
    "test/importance_e0",
)


def test_help_lists_groups_and_options(cli, tmp_path):
    out = cli("--help")
    assert out.returncode == 0
    listed = {}
    for line in out.stdout.splitlines():
        group, sep, options = line.partition(": ")
        if sep and group.isidentifier():
            listed[group] = set(options.split(", "))
    assert {"shapes", "digits", "mnist_5k"} <= listed["data"]
    assert {"softmax", "topk", "noisy_topk", "switch", "expert_choice", "soft"} <= listed["gate"]
    assert {"cnn", "mlp", "tree", "mixed"} <= listed["expert"]
    assert {"none", "importance", "load", "switch", "zloss"} <= listed["regularizer"]
    assert {"joint"} <= listed["strategy"] and {"mixture", "vmoe"} <= listed["model"]
    assert {"trainer", "logger", "experiment"} <= set(listed)
    assert not (tmp_path / "outputs").exists()


def test_a_tiny_run_writes_a_complete_run_folder(app, tmp_path):
    out = app(*QUICK, "plots=false")  # the installed script itself: test_plugins, test_resume
    assert out.returncode == 0, out.stderr
    run = single_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    for key in (*METRIC_KEYS, "params_total", "params_active", "wall_time_s"):
        assert key in summary, key
    assert 0.0 <= summary["test/acc"] <= 1.0
    assert summary["params_active"] < summary["params_total"]
    loads = [summary[f"test/load_e{i}"] for i in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / summary["best_checkpoint"]).is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"train/acc", "val/acc", "train/cv_load", "val/load_e3", "val/importance_e0"} <= columns
    # one val row per training epoch; the final evaluation of the best checkpoint says so
    assert [r["epoch"] for r in rows if r["val/acc"] and r["phase"] == "fit"] == ["0"]
    (final,) = [r for r in rows if r["val/acc"] and r["phase"] == "validate"]
    assert float(final["val/acc"]) == pytest.approx(summary["val/acc"])
    assert {r["phase"] for r in rows} == {"fit", "validate", "test"}
    assert "epoch 0: train/loss=" in (run / "moe-exp.log").read_text()  # the epoch summary
    assert "epoch 1/1 [####################]" in out.stdout  # progress lines outside a terminal


def test_a_2x2_multirun_makes_four_job_folders(quick_sweep):
    summaries = sorted(quick_sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    seen = set()
    for path in summaries:
        data = json.loads(path.read_text())
        assert data["status"] == "completed"
        seen.add(tuple(sorted(data["overrides"])))
    assert len(seen) == 4


def test_the_users_own_command_works_with_overrides_on_both_sides_of_m(app, tmp_path):
    out = app("gate=noisy_topk", "-m", "experts=8", *QUICK, "plots=false")
    assert out.returncode == 0, out.stderr
    (summary,) = tmp_path.glob("outputs/multiruns/*/*/0/summary.json")
    data = json.loads(summary.read_text())
    assert data["status"] == "completed" and "test/load_e7" in data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gate=nope"], "Could not find 'gate/nope'"),
        (["experts=abc"], "experts='abc' has the wrong type: expected int"),
        (["experts=0"], "experts=0 must be >= 1"),
        (["k=0"], "k=0 must be >= 1"),
        (["k=5"], "k=5 must be <= experts=4"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be > 0"),
        (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
        (["gate=switch", "k=2"], "k=2 asks for top-2 routing, but gate=switch is top-1 only"),
        (["regularizer=tree_balance"], "regularizer.tree_balance (tree balance) needs soft-tree"),
        (["expert.dropout=1.5"], "expert.dropout=1.5 must be a number in [0, 1)"),
        (
            ["callbacks.model_checkpoint.monitor=loss"],
            "callbacks.model_checkpoint.monitor='loss' must name a metric logged while training",
        ),
        (  # found by the config property test: refused at the check, not in the constructor
            ["expert=linear", "model=dense_flops"],
            "model=dense_flops: a dense baseline scales the expert's width, but LinearExpert",
        ),
        (  # found by the config property test: refused before the data is built
            ["data=digits", "strategy=hierarchical_attribute"],
            "strategy.attribute='colour' is not a discrete latent of this data; available: none",
        ),
        (  # refused by the constructor, after the checks: one message, not Hydra's traceback
            ["model.combine=xyz"],
            "model could not be built: combine='xyz' is not one of probs, logits",
        ),
        (
            ["strategy=em", "trainer.gradient_clip_val=1"],
            "trainer.gradient_clip_val=1 cannot apply to strategy=em",
        ),
    ],
)
def test_bad_input_fails_with_a_message_not_a_traceback(app, tmp_path, args, message):
    out = app(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    if args != ["gate=nope"]:  # composed: the run folder records the failure
        summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
        assert summary["status"] == "failed" and message in summary["error"]


def test_unknown_option_lists_the_available_ones(app):
    out = app("gate=nope")
    assert "Available options" in out.stderr and "noisy_topk" in out.stderr


def test_the_full_trace_comes_only_on_request(tmp_path):
    from tests.conftest import CLI

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run([CLI, "k=0"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError: Invalid configuration: k=0" in out.stderr


def test_a_key_typo_gets_hydras_own_message(app, tmp_path):
    out = app("optim.lrr=0.1")
    assert out.returncode != 0
    assert "Could not override 'optim.lrr'" in out.stderr
    assert "Key 'lrr' is not in struct" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()  # refused before a run folder exists


def test_a_single_diverged_run_exits_non_zero(app, tmp_path):
    out = app(*QUICK, "optim.lr=1e9")
    assert out.returncode != 0
    assert "Training diverged: the loss became nan" in out.stderr
    assert "Traceback" not in out.stderr
    summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "diverged" and "Lower the learning rate" in summary["error"]


def test_same_seed_gives_the_same_summary(tmp_path):
    """Two runs in this process (after many other tests, whatever state they left): equal."""
    results = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        out = run_app(*QUICK, *TINY_DATA, "plots=false", "seed=7", cwd=tmp_path / name)
        assert out.returncode == 0, out.stderr
        data = json.loads((single_run_dir(tmp_path / name) / "summary.json").read_text())
        results.append({k: v for k, v in data.items() if "/" in k})
    assert results[0] == results[1]
    assert "test/acc" in results[0]


def test_an_installed_wheel_uses_the_packaged_configs(tmp_path):
    """Build a real wheel, install it into a scratch folder, run it from elsewhere."""
    repo = Path(__file__).resolve().parents[2]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, repo],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("moe_exp-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True
    )
    code = (
        "import sys, moe_exp, moe_exp.app.cli as c; print('AT', moe_exp.__file__, c.config_dir());"
        "sys.argv=['moe-exp', 'gate=topk', 'experts=6', '--cfg', 'job']; c.main()"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    location = out.stdout.split("AT ", 1)[1].split("\n", 1)[0]
    assert location.startswith(str(site)) and str(site / "moe_exp" / "conf") in location
    assert "experts: 6" in out.stdout and "moe_exp.moe.gates.topk.TopKGate" in out.stdout


def test_a_diverging_job_stops_with_a_message_and_the_sweep_goes_on(app, tmp_path):
    from moe_exp.analysis.report import build_report

    out = app(
        "-m", *QUICK, "plots=false", "optim.lr=1e9,0.003"
    )  # the diverging job first: the sweep goes on
    assert out.returncode != 0  # non-zero, after every job ran
    assert "Training diverged: the loss became nan" in out.stderr
    assert "Traceback" not in out.stderr
    sweep = single_sweep_dir(tmp_path)
    statuses = {}
    for path in sweep.glob("*/summary.json"):
        data = json.loads(path.read_text())
        statuses[data["overrides"][-1]] = data["status"]
    assert statuses == {"optim.lr=0.003": "completed", "optim.lr=1000000000.0": "diverged"}
    table = build_report([sweep], tmp_path / "report", plots=False)
    assert sorted(row[-1] for row in table["rows"]) == ["1 completed", "1 diverged"]
