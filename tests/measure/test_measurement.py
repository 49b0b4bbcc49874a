"""What a finished run measures: cost, similarity, pictures, W&B offline, collapse alarm."""

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_exp.measure.cost import flops_per_sample
from moe_exp.measure.similarity import expert_similarity, similarity_summary
from moe_exp.moe import MoE, TopKGate
from moe_exp.training.callbacks import CollapseAlarm
from tests.conftest import QUICK, run_app, single_run_dir


class LinearMixture(nn.Module):
    def __init__(self, d, c, e, k):
        super().__init__()
        self.moe = MoE(TopKGate(d, e, k=k), [nn.Linear(d, c) for _ in range(e)])

    def forward(self, x):
        y, routing = self.moe(x)
        return y, [routing]


def test_flops_by_hand():
    n, d, c, e, k = 32, 10, 6, 8, 2
    model = LinearMixture(d, c, e, k)
    flops = flops_per_sample(model, torch.randn(n, d))
    router, expert = 2 * d * e, 2 * d * c  # per input: one matmul each
    assert flops["flops_active"] == router + k * expert
    assert flops["flops_dense_equal_params"] == router + e * expert


def test_identical_experts_have_cka_one():
    model = LinearMixture(6, 4, 3, 1)
    model.moe.experts[1].load_state_dict(model.moe.experts[0].state_dict())
    (cka,) = expert_similarity(model, torch.randn(64, 6))
    assert abs(float(cka[0, 1]) - 1.0) < 1e-9 and float(cka[0, 2]) < 0.99
    assert similarity_summary([cka])["expert_cka_max"] > 0.999


def test_collapse_alarm_fires_after_patience(tmp_path):
    alarm = CollapseAlarm(tmp_path, patience=2)
    healthy = {"dead_experts": 0.0, "importance_e0": 0.3, "importance_e1": 0.7}
    dead = {"dead_experts": 1.0, "importance_e0": 0.0, "importance_e1": 1.0}
    assert alarm._problems(healthy) == ["one expert takes 70% of the routing weight"]
    assert alarm._problems({"dead_experts": 0.0, "importance_e0": 0.5, "importance_e1": 0.5}) == []
    assert "1 expert(s) dead by load (almost no inputs)" in alarm._problems(dead)
    # every expert gets inputs, but two carry no weight: the alarm says which kind
    second_choices = {"dead_experts": 2.0, "dead_experts_load": 0.0, "dead_experts_weight": 2.0}
    assert alarm._problems(second_choices) == [
        "2 expert(s) dead by weight (they receive inputs but carry almost none of the combine "
        "weight)"
    ]

    module = SimpleNamespace(history={"val": []}, log=lambda *args, **kwargs: None)
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0)
    for epoch, metrics in enumerate([dead, dead, dead]):
        trainer.current_epoch = epoch
        module.history["val"].append(metrics)
        alarm.on_train_epoch_end(trainer, module)
    assert alarm.events == 1 and alarm.streak == 3
    alarm.on_train_epoch_end(trainer, module)  # an epoch without a validation: no new look
    assert alarm.streak == 3
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["epoch"] == 1 and event["event"] == "collapse"


def test_a_run_with_wandb_offline_writes_everything(app, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # W&B in this process: no stdout capture
    out = app(*QUICK, "logger=[csv,wandb]", "tags=[baseline]")
    assert out.returncode == 0, out.stderr
    assert "W&B logging OFFLINE" in out.stdout + out.stderr
    run = single_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "test/nmi_label",
        "test/nmi_shape",
        "test/nmi_colour",
        "test/max_vio",
        "test/gate_entropy",
        "test/dead_experts",
        "test/experts_per_input",
        "flops_active",
        "flops_dense_equal_params",
        "expert_cka_mean",
        "train_samples_per_s",
        "collapse_events",
    ):
        assert key in summary, key
    assert summary["flops_active"] < summary["flops_dense_equal_params"]
    for name in (
        "expert_class",
        "expert_shape",
        "expert_colour",
        "gate_entropy",
        "load_over_epochs",
        "examples_per_expert",
        "expert_similarity",
    ):
        png = run / "plots" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 5000, name
        assert f"plots/{name}.png" in summary["plots"]
    run_id = (run / "wandb_id.txt").read_text().strip()
    (wandb_file,) = run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    blob = wandb_file.read_bytes()
    # the nested config, the run's name (its overrides) and the summary metrics are logged
    assert b"moe_exp.moe.gates.noisy_topk.NoisyTopKGate" in blob and b"n_train" in blob
    assert b"experiment=quick" in blob and b"test/acc" in blob
    media = list(Path(wandb_file.parent, "files", "media", "images").rglob("*.png"))
    assert len(media) >= 7
    tables = Path(wandb_file.parent, "files", "media", "table", "tables")
    (experts,) = tables.glob("experts_*.table.json")
    table = json.loads(experts.read_text())
    assert table["columns"] == ["split", "expert", "load", "importance", "acc", "seen"]
    assert {row[0] for row in table["data"]} == {"train", "val", "test"}
    assert len(table["data"]) == 3 * 4  # every split, every expert
    (contingency,) = tables.glob("expert_class_*.table.json")
    assert len(json.loads(contingency.read_text())["data"]) == 4 * 16  # experts × classes
    records = list(wandb_records(wandb_file))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert list(meta.tags) == ["baseline"] and meta.job_type == "train"
    metrics = {
        r.metric.name or r.metric.glob_name: r.metric
        for r in records
        if r.WhichOneof("record_type") == "metric"
    }
    assert metrics["train/*"].step_metric == "epoch" and metrics["val/*"].step_metric == "epoch"
    assert metrics["val/acc"].summary.max  # the summary keeps the best val/acc

    # the eval command logs a linked W&B run: job_type eval, the trained run's id in its config
    evaluated = run_app(f"run={run}", "data.n_test=64", cwd=tmp_path, program="moe-exp-eval")
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_file,) = run.glob("evals/*/wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(eval_file))
    (eval_meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert eval_meta.job_type == "eval" and eval_meta.run_group == f"run-{run_id}"
    configs = [eval_meta.config] + [
        r.config for r in records if r.WhichOneof("record_type") == "config"
    ]
    linked = {item.key: item.value_json for c in configs for item in c.update}
    assert json.loads(linked["evaluated_wandb_id"]) == run_id
    assert list(eval_file.parent.glob("files/media/table/tables/experts_*.table.json"))


def wandb_records(path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 32 KiB blocks of
    chunks with 7-byte headers, after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, offset, pending = Path(path).read_bytes(), 7, b""
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += 32768 - offset % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_eval_accuracy_is_the_eval_mode_accuracy_of_the_whole_split():
    from moe_exp.app.build import build_components
    from moe_exp.app.run import eval_accuracy
    from tests.conftest import compose_config

    torch.manual_seed(0)
    _, module = build_components(compose_config([*QUICK, "expert.dropout=0.5"]))
    datamodule, _ = build_components(compose_config(QUICK))
    split = datamodule.splits["train"]
    module.model.train()
    first = eval_accuracy(module, split, batch_size=100)
    assert module.model.training  # mode restored
    assert eval_accuracy(module, split, batch_size=512) == first  # dropout off: deterministic
    module.model.eval()
    with torch.no_grad():
        predicted = module.model(split.images)[0].argmax(-1)
    assert first == pytest.approx((predicted == split.labels).double().mean().item(), abs=1e-9)
