"""moe-exp-eval: a saved run evaluated again, on its own split, another capacity, another
split, across a sweep of runs, and read by the report."""

import json
import shutil

import pytest

from moe_exp.analysis.report import build_report
from tests.conftest import run_app


def _eval(*args, cwd):
    return run_app(*args, cwd=cwd, program="moe-exp-eval")


def _evals(run):
    return sorted(run.glob("evals/*/summary.json"))


@pytest.fixture
def run(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def test_eval_on_the_runs_own_test_split_repeats_its_accuracy(run, tmp_path):
    before = (run / "summary.json").read_text()
    out = _eval(f"run={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (summary_path,) = _evals(run)
    summary = json.loads(summary_path.read_text())
    trained = json.loads(before)
    assert summary["status"] == "completed" and summary["evaluated"]["split"] == "test"
    assert summary["evaluated"]["checkpoint"].endswith("checkpoints/best.ckpt")
    assert summary["test/acc"] == trained["test/acc"]
    assert summary["test/cv_load"] == pytest.approx(trained["test/cv_load"], abs=1e-6)
    assert (summary_path.parent / "routing" / "test.csv").is_file()
    assert (run / "summary.json").read_text() == before  # the run's record is untouched


def test_eval_with_a_capacity_limit_and_on_another_split(run, tmp_path):
    limited = _eval(f"run={run}", "gate.eval_capacity_factor=0.5", cwd=tmp_path)
    assert limited.returncode == 0, limited.stderr
    val = _eval(f"run={run}", "split=val", "ckpt=last", cwd=tmp_path)
    assert val.returncode == 0, val.stderr
    by_split = {json.loads(p.read_text())["evaluated"]["split"]: p for p in _evals(run)}
    capped = json.loads(by_split["test"].read_text())
    assert capped["test/dropped_fraction"] > 0 and capped["overrides"] == [
        "gate.eval_capacity_factor=0.5"
    ]
    assert (by_split["val"].parent / "routing" / "val.csv").is_file()


def test_a_bad_run_folder_or_a_changed_architecture_fails_with_a_message(run, tmp_path):
    missing = _eval(f"run={tmp_path / 'nothing'}", cwd=tmp_path)
    assert missing.returncode != 0 and "not a run folder" in missing.stderr
    changed = _eval(f"run={run}", "expert.width=4", cwd=tmp_path)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "checkpoint shape" in changed.stderr  # names the tensors that differ
    failed = [json.loads(p.read_text()) for p in _evals(run)]
    assert [s["status"] for s in failed] == ["failed"]


def test_a_sweep_over_two_runs_and_the_report_reads_the_evals(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    out = _eval("-m", f"run={run},{other}", "data.n_test=64", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for folder in (run, other):
        (summary,) = _evals(folder)
        assert json.loads(summary.read_text())["status"] == "completed"
    report = build_report([run / "evals", other / "evals"], tmp_path / "report", plots=False)
    assert report["runs"] == 2
