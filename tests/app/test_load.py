"""Self-describing checkpoints and ``moe_exp.load`` in a notebook, without Hydra."""

import json
import shutil

import pytest
import torch

import moe_exp
from moe_exp.app.config import instantiate
from moe_exp.errors import MoeExpError
from moe_exp.training.checkpoints import load_checkpoint


@pytest.fixture
def trained(tiny_run):
    return tiny_run


def _test_accuracy(model, cfg):
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    split = datamodule.splits["test"]
    size = cfg.data.eval_batch_size
    with torch.no_grad():
        correct = sum(
            int((model(x)[0].argmax(-1) == y).sum())
            for x, y in zip(split.images.split(size), split.labels.split(size), strict=True)
        )
    return correct / len(split)


def test_a_copied_best_checkpoint_rebuilds_its_model_alone(trained, tmp_path):
    alone = tmp_path / "copied.ckpt"
    shutil.copy(trained / "checkpoints" / "best.ckpt", alone)
    checkpoint = load_checkpoint(alone)
    assert checkpoint["moe_exp"]["version"] == moe_exp.__version__
    assert checkpoint["moe_exp"]["config"]["experts"] == 4
    model, cfg = moe_exp.load(alone)
    assert not model.training and cfg.gate._target_.endswith("NoisyTopKGate")
    log_probs, routings = model(torch.zeros(2, *checkpoint["moe_exp"]["in_shape"]))
    assert log_probs.shape == (2, checkpoint["moe_exp"]["num_classes"]) and len(routings) == 1
    summary = json.loads((trained / "summary.json").read_text())
    assert _test_accuracy(model, cfg) == summary["test/acc"]


def test_an_older_checkpoint_without_its_config_loads_from_its_run_folder(trained, tmp_path):
    run = tmp_path / "old_run"
    shutil.copytree(trained, run)
    path = run / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["moe_exp"]
    torch.save(checkpoint, path)
    model, cfg = moe_exp.load(run)
    assert _test_accuracy(model, cfg) == json.loads((run / "summary.json").read_text())["test/acc"]
    shutil.copy(path, tmp_path / "orphan.ckpt")
    with pytest.raises(MoeExpError, match="does not say what it is"):
        moe_exp.load(tmp_path / "orphan.ckpt")


def test_every_run_writes_a_routing_table_that_agrees_with_its_summary(trained):
    import csv

    summary = json.loads((trained / "summary.json").read_text())
    assert summary["routing_tables"] == ["routing/test.csv", "routing/val.csv"]
    rows = list(csv.DictReader((trained / "routing" / "test.csv").open()))
    assert len(rows) == 128 and [int(r["index"]) for r in rows] == list(range(128))
    correct = sum(r["label"] == r["prediction"] for r in rows)
    assert correct / len(rows) == summary["test/acc"]
    for row in rows:
        assert row["shape"] in ("circle", "square", "triangle", "cross")
        weights = [float(row[f"weight_{j}"]) for j in (1, 2)]
        assert weights[0] >= weights[1] and abs(sum(weights) - 1) < 1e-4  # top-2, renormalised
        assert row["expert_1"] != row["expert_2"] and row["dropped"] == "0"
        assert abs(sum(float(row[f"p_e{e}"]) for e in range(4)) - 1) < 1e-4
