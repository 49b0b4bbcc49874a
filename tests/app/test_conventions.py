"""Lightning-Hydra habits: the callbacks group, debug presets, tags and task names, paths and
a machine's own local settings."""

import csv
import json

import pytest
import torch

from moe_exp.analysis.report import build_report
from tests.conftest import TINY, compose_config, single_run_dir


def test_a_chosen_list_of_callbacks_keeps_the_runners_own():
    cfg = compose_config(["callbacks=[lr_monitor,early_stopping]"])
    assert list(cfg.callbacks) == [
        "model_checkpoint",
        "interrupt_checkpoint",
        "collapse_alarm",
        "progress_bar",
        "lr_monitor",
        "early_stopping",
    ]
    rich = compose_config(["callbacks=rich_progress_bar"]).callbacks.progress_bar
    assert rich._target_ == "lightning.pytorch.callbacks.RichProgressBar"


def test_checkpoint_on_val_loss_with_lr_monitor_tags_and_no_alarm(app, tmp_path):
    out = app(
        *TINY,
        "trainer.max_epochs=2",
        "callbacks=lr_monitor",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.mode=min",
        "callbacks.collapse_alarm=null",
        "tags=[a,b]",
    )
    assert out.returncode == 0, out.stderr
    run = single_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tags"] == ["a", "b"] and summary["task_name"] == "runs"
    assert summary["collapse_events"] is None  # the alarm was off
    saved = torch.load(run / summary["best_checkpoint"], weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("ModelCheckpoint")]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [float(r["val/loss"]) for r in rows if r["val/loss"] and r["phase"] == "fit"]
    assert state["monitor"] == "val/loss" and float(state["best_model_score"]) == min(losses)
    assert {"lr-AdamW/router", "lr-AdamW/model"} <= set(rows[0])  # the router's group apart
    assert build_report([tmp_path / "outputs"], tmp_path / "r", plots=False, tags=["a"])
    with pytest.raises(SystemExit, match="tagged c"):
        build_report([tmp_path / "outputs"], tmp_path / "r", plots=False, tags=["c"])


def test_debug_fdr_runs_one_batch_and_claims_no_results(app, tmp_path):
    out = app(*TINY, "debug=fdr")
    assert out.returncode == 0, out.stderr
    (summary_path,) = tmp_path.glob("outputs/debug/*/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "debug" and summary["debug_run"] == "fdr"
    assert not [k for k in summary if k.startswith(("test/", "val/"))]
    assert "1 batch(es) of each split" in summary["fast_dev_run"]


@pytest.mark.parametrize("preset", ["fdr", "overfit", "limit", "profiler"])
def test_every_debug_preset_composes_to_trainer_flags(preset):
    cfg = compose_config([f"debug={preset}"])
    assert cfg.task_name == "debug" and cfg.debug_run == preset
    flags = ("fast_dev_run", "overfit_batches", "limit_train_batches", "profiler")
    assert any(cfg.trainer[f] for f in flags)


def test_a_machines_local_settings_and_paths_compose(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "default.yaml").write_text(
        "# @package _global_\npaths:\n  output_dir: /scratch/me\n  data_dir: /data\n"
    )
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "data=mnist"])
    assert cfg.paths.output_dir == "/scratch/me" and cfg.data.root == "/data"
    assert compose_config(["data=mnist"]).paths.output_dir == "outputs"  # optional: absent here
