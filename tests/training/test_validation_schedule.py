"""Validation on a step schedule (``trainer.val_check_interval`` across epochs): the record
says when each validation ran, and nothing of an older validation is shown as this epoch's."""

import csv

from moe_exp.training.checkpoints import load_checkpoint
from tests.conftest import TINY, single_run_dir


def test_validations_every_six_steps_are_placed_at_the_epochs_they_ran(app, tmp_path):
    # 256 training images in batches of 64: 4 steps per epoch, so steps 6 and 12 fall in the
    # middle of epoch 1 and at the end of epoch 2
    out = app(
        *TINY,
        "trainer.max_epochs=3",
        "trainer.val_check_interval=6",
        "trainer.check_val_every_n_epoch=null",
    )
    assert out.returncode == 0, out.stderr
    run = single_run_dir(tmp_path)
    history = load_checkpoint(run / "checkpoints" / "last.ckpt")["history"]
    assert [h["epoch"] for h in history["val"]] == [1.5, 3.0]

    lines = [
        line for line in (run / "moe-exp.log").read_text().splitlines() if "] - epoch " in line
    ]
    assert len(lines) == 3
    assert "val/acc" not in lines[0] and "gap/acc" not in lines[0]
    assert all("val/acc" in line and "gap/acc" in line for line in lines[1:])

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    fit = [r for r in rows if r.get("phase", "fit") == "fit"]
    assert [r["epoch"] for r in fit if r.get("train/acc")] == ["0", "1", "2"]
    assert [r["epoch"] for r in fit if r.get("gap/acc")] == ["1", "2"]  # none without a look
