"""Resume: a run stopped by SIGTERM/SIGINT leaves checkpoints/last.ckpt and continues in its
own folder with ``moe-exp resume=<folder>``; checkpoints load with weights_only=True, and a
corrupted or mismatched one fails with a message naming the key and both shapes."""

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from moe_exp.app.build import build_components
from moe_exp.app.resume import check_same_schedule, first_epoch_after, resume_argv
from moe_exp.errors import ConfigError, MoeExpError
from moe_exp.training.checkpoints import SHOWN_MISMATCHES, check_fits, load_checkpoint
from tests.conftest import CLI, QUICK, compose_config, run_app, run_cli, single_run_dir

# Two epochs of 32 batches: the kill lands inside the second epoch.
LONGER = [*QUICK, "data.n_train=2048", "trainer.max_epochs=2", "seed=3"]


def metrics(summary: dict) -> dict:
    """The summary's metrics, less the interrupted epoch's running training means (train/*
    except the eval-mode train/acc_eval, and the gap/acc and gap/loss built from them): a
    resumed run averages only the batches trained after the resume (the accumulators are
    not in the checkpoint). Every validation, test and eval-mode value must match exactly."""
    running = ("gap/acc", "gap/loss")
    return {
        k: v
        for k, v in summary.items()
        if "/" in k and k not in running and not (k.startswith("train/") and k != "train/acc_eval")
    }


def val_rows(folder: Path) -> dict[str, dict[str, str]]:
    """Each epoch's validation metrics as metrics.csv holds them (exact decimal strings)."""
    rows = csv.DictReader((folder / "metrics.csv").open())
    return {
        r["epoch"]: {k: v for k, v in r.items() if k.startswith("val/") and v}
        for r in rows
        if r.get("val/acc")
    }


def fake_run(folder: Path, state_dict: dict, overrides: list[str]) -> Path:
    """A run folder as an interrupted run leaves it: overrides and a last checkpoint."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "checkpoints").mkdir()
    torch.save({"state_dict": state_dict, "epoch": 0}, folder / "checkpoints" / "last.ckpt")
    return folder


# -- the command line -----------------------------------------------------------------------
def test_resume_reruns_the_saved_overrides_in_the_same_folder(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- experiment=quick\n- seed=3\n- resume=/an/earlier/resume\n"
    )
    argv = resume_argv(["moe-exp", f"resume={run}", "threads=1"])
    assert argv == [
        "moe-exp",
        "experiment=quick",
        "seed=3",
        "threads=1",
        f"resume={run}",
        f"hydra.run.dir={run}",
    ]
    assert resume_argv(["moe-exp", "seed=1"]) == ["moe-exp", "seed=1"]


def test_a_folder_with_odd_characters_survives_hydras_parser(tmp_path):
    run = tmp_path / "my runs, 'best'" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    argv = resume_argv(["moe-exp", f"resume={run}"])
    parsed = OverridesParser.create().parse_overrides(argv[1:])
    assert [o.value() for o in parsed] == [str(run), str(run)]


def test_resume_of_something_that_is_not_a_run_folder_says_so(tmp_path):
    with pytest.raises(SystemExit, match="is not a run folder"):
        resume_argv(["moe-exp", f"resume={tmp_path}"])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    with pytest.raises(SystemExit, match="drop -m"):
        resume_argv(["moe-exp", "-m", f"resume={tmp_path}"])


def test_resuming_a_completed_run_is_refused_and_leaves_it_as_it_is(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- experiment=quick\n")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"status": "completed", "test/acc": 0.9}))
    before = summary.read_text()
    with pytest.raises(SystemExit, match="this run completed; there is nothing to continue"):
        resume_argv(["moe-exp", f"resume={tmp_path}", "trainer.max_epochs=5"])
    assert summary.read_text() == before
    summary.write_text(json.dumps({"status": "interrupted"}))
    assert resume_argv(["moe-exp", f"resume={tmp_path}"])[1] == "experiment=quick"


# -- checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def states() -> dict[str, dict]:
    """Model state_dicts of three configurations (no training)."""
    out = {}
    for name, extra in {"e4": [], "e8": ["experts=8"], "mlp": ["expert=mlp"]}.items():
        _, module = build_components(compose_config([*QUICK, *extra]))
        out[name] = module.state_dict()
    return out


def test_a_checkpoint_with_another_expert_count_names_the_key_and_both_shapes(states, tmp_path):
    with pytest.raises(MoeExpError) as err:
        check_fits(states["e4"], states["e8"], tmp_path / "last.ckpt")
    message = str(err.value)
    assert "does not fit this model" in message and "last.ckpt" in message
    key = next(k for k in states["e8"] if states["e8"][k].shape != states["e4"][k].shape)
    want = list(states["e8"][key].shape)
    have = list(states["e4"][key].shape)
    assert f"{key}: checkpoint shape {have}, model shape {want}" in message
    e4, e8 = states["e4"], states["e8"]
    mismatched = sum(k in e4 and e4[k].shape != e8[k].shape for k in e8)
    missing = sum(k not in e4 for k in e8)  # experts 4-7
    assert missing > 0 and f"; and {mismatched + missing - SHOWN_MISMATCHES} more" in message
    # a checkpoint lacking only expert 7 is named by its keys
    without_7 = {k: v for k, v in e8.items() if not k.startswith("model.moe.experts.7.")}
    with pytest.raises(MoeExpError, match=r"model\.moe\.experts\.7\..*in the model, not in"):
        check_fits(without_7, e8, tmp_path / "last.ckpt")


def test_a_checkpoint_of_another_architecture_lists_the_keys_it_lacks(states, tmp_path):
    with pytest.raises(MoeExpError, match="in the model, not in the checkpoint"):
        check_fits(states["mlp"], states["e4"], tmp_path / "last.ckpt")
    check_fits(states["e4"], states["e4"], tmp_path / "last.ckpt")  # the same model fits


def test_corrupted_and_unsafe_checkpoints_fail_clearly(states, tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": states["e4"], "epoch": 1}, good)
    assert load_checkpoint(good)["epoch"] == 1
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(MoeExpError, match="could not be read: it is corrupted"):
            load_checkpoint(path)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "extra": Path("/an/object")}, unsafe)  # not plain data
    with pytest.raises(MoeExpError, match=r"refused by torch.load\(weights_only=True\)"):
        load_checkpoint(unsafe)
    with pytest.raises(MoeExpError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_resuming_with_another_expert_count_fails_before_training(states, tmp_path):
    run = fake_run(tmp_path / "run", states["e4"], QUICK)
    out = run_app(f"resume={run}", "experts=8", cwd=tmp_path)
    assert out.returncode != 0
    assert "does not fit this model" in out.stderr and "model shape [8" in out.stderr
    assert "Traceback" not in out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint shape [4" in summary["error"]


def test_resuming_with_another_schedule_length_fails_before_training(states, tmp_path):
    run = fake_run(tmp_path / "run", states["e4"], QUICK)
    OmegaConf.save(compose_config(QUICK), run / "config.yaml")
    out = run_app(f"resume={run}", "trainer.max_epochs=3", "data.batch_size=32", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert (
        "cannot change trainer.max_epochs=3 (the run has 1), data.batch_size=32 (the run has 64)"
        in out.stderr
    )
    assert not (run / "metrics.csv").exists() and not (run / "summary.json").exists()


def test_the_carried_rows_are_back_on_disk_before_training(tmp_path):
    """Lightning's CSV logger deletes metrics.csv when it starts; a resumed run writes the
    rows it keeps back at once, so one that fails later loses none of them."""
    from moe_exp.app.run import make_trainer

    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc\n0,31,0.5\n1,63,0.75\n")
    make_trainer(compose_config(QUICK), tmp_path, resume_from={"epoch": 1})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["epoch"], r["val/acc"]) for r in rows] == [("0", "0.5")]


def test_the_first_epoch_after_a_checkpoint_follows_the_fit_loop_progress():
    def saved(epoch, processed):
        progress = {"current": {"processed": processed}}
        return {"epoch": epoch, "loops": {"fit_loop": {"epoch_progress": progress}}}

    assert first_epoch_after(saved(1, 1)) == 1  # stopped inside epoch 1: it runs again
    assert first_epoch_after(saved(0, 1)) == 1  # saved at epoch 0's end: epoch 1 is next
    assert first_epoch_after({"epoch": 2}) == 2  # no loop state: the saved epoch


def test_a_resume_on_another_rank_leaves_the_metrics_to_rank_0(tmp_path, monkeypatch):
    """In DDP every rank builds a Trainer; the CSV logger writes on rank 0 only."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from moe_exp.app.run import make_trainer

    text = "epoch,step,val/acc\n0,31,0.5\n1,63,0.75\n"
    (tmp_path / "metrics.csv").write_text(text)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    make_trainer(compose_config(QUICK), tmp_path, resume_from={"epoch": 1})
    assert (tmp_path / "metrics.csv").read_text() == text


def test_the_schedule_check_skips_constant_rates_and_keys_an_old_run_lacks(tmp_path):
    saved = tmp_path / "config.yaml"
    OmegaConf.save(compose_config([*QUICK, "optim.scheduler=none"]), saved)
    longer = compose_config([*QUICK, "optim.scheduler=none", "trainer.max_epochs=3"])
    check_same_schedule(tmp_path, saved, longer)  # no schedule: any length resumes
    cfg = compose_config(QUICK)
    OmegaConf.save(OmegaConf.masked_copy(cfg, ["optim", "trainer"]), saved)  # no data section
    check_same_schedule(tmp_path, saved, compose_config([*QUICK, "data.batch_size=32"]))
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=3 \(the run has 1\)"):
        check_same_schedule(tmp_path, saved, compose_config([*QUICK, "trainer.max_epochs=3"]))


# -- kill and resume ------------------------------------------------------------------------
def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["WANDB_MODE"] = "offline"
    return subprocess.Popen(
        [CLI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stop_in_epoch_2(proc: subprocess.Popen, sig: signal.Signals) -> str:
    """Send ``sig`` when the progress line of a quarter of epoch 2 appears; all output."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 2/2 [#####....."):
            proc.send_signal(sig)
            break
    lines.append(proc.stdout.read())
    proc.wait(timeout=120)
    return "".join(lines)


@pytest.mark.slow
def test_a_run_killed_by_sigterm_resumes_to_exactly_the_uninterrupted_metrics(tmp_path):
    """Bit-identical, not within a tolerance: on the CPU every operation here is
    deterministic, and the checkpoint carries everything else a continued run needs
    (ExactResume): the global random states (noisy gating, dropout), the data loader's
    generator states at the epoch's start and the batches already trained, which are drawn
    again and skipped. The killed run also logs to W&B (offline) and reuses its run id.
    ~90 s: three real runs."""
    (tmp_path / "killed").mkdir()
    (tmp_path / "whole").mkdir()
    whole = start(LONGER, tmp_path / "whole")
    killed = start([*LONGER, "logger=[csv,wandb]"], tmp_path / "killed")
    output = stop_in_epoch_2(killed, signal.SIGTERM)
    assert killed.returncode == 128 + signal.SIGTERM, output
    folder = single_run_dir(tmp_path / "killed")
    stopped = json.loads((folder / "summary.json").read_text())
    assert stopped["status"] == "interrupted"
    assert "Interrupted by SIGTERM at epoch 1, batch" in stopped["error"]
    batch = int(stopped["error"].split("batch ")[1].split("/")[0])
    assert 0 < batch < 32  # mid-epoch
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    wandb_id = (folder / "wandb_id.txt").read_text()

    out = run_cli(f"resume={folder}", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    resumed = json.loads((folder / "summary.json").read_text())
    uninterrupted = json.loads((single_run_dir(tmp_path / "whole") / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumes"] == 1
    assert resumed["overrides"] == uninterrupted["overrides"] + ["logger=[csv,wandb]"]
    assert resumed["wall_time_s"] > stopped["wall_time_s"]
    assert len(metrics(resumed)) > 40
    assert metrics(resumed) == metrics(uninterrupted)
    assert resumed["epochs"] == uninterrupted["epochs"] == 2
    # The summary evaluates the best checkpoint, which may be epoch 0's; the validation of
    # epoch 1 (the model trained after the resume) must match as well, to the last digit.
    resumed_rows, whole_rows = val_rows(folder), val_rows(single_run_dir(tmp_path / "whole"))
    assert {"0", "1"} <= set(resumed_rows)  # the row logged before the kill was kept
    assert len(resumed_rows["1"]) > 20
    assert resumed_rows["1"] == whole_rows["1"]
    assert resumed_rows == whole_rows
    assert (folder / "wandb_id.txt").read_text() == wandb_id
    runs = list((folder / "wandb").glob(f"offline-run-*-{wandb_id.strip()}"))
    assert len(runs) == 2  # the first attempt and the resumed one: the same W&B run


@pytest.mark.slow  # a real process killed mid-run; the record's accounting is tested below
def test_a_run_killed_after_an_epoch_keeps_that_epochs_rows_and_history(tmp_path):
    """SIGKILL leaves only the checkpoint of the last epoch's end (no interrupt handler
    runs); the resumed run starts at the next epoch and keeps the earlier epoch's
    metrics.csv rows and per-epoch history (the load-over-epochs plot)."""
    killed = start(LONGER, tmp_path)
    stop_in_epoch_2(killed, signal.SIGKILL)
    folder = single_run_dir(tmp_path)
    killed_record = json.loads((folder / "summary.json").read_text())
    assert killed_record["status"] == "running" and killed_record["epochs"] == 1
    assert load_checkpoint(folder / "checkpoints" / "last.ckpt")["epoch"] == 0
    rows_before = val_rows(folder)
    assert set(rows_before) == {"0"}

    out = run_app(f"resume={folder}", cwd=tmp_path)  # the kill needs a process, the resume not
    assert out.returncode == 0, out.stderr
    record = json.loads((folder / "summary.json").read_text())
    # the killed part's time counts (up to its last epoch end), and the record says resumed
    assert record["resumes"] == 1 and record["resumed_from_epoch"] == 0
    assert record["wall_time_s"] > killed_record["wall_time_s"] > 0
    rows = val_rows(folder)
    assert rows["0"] == rows_before["0"] and "1" in rows
    train_epochs = [
        r["epoch"] for r in csv.DictReader((folder / "metrics.csv").open()) if r.get("train/acc")
    ]
    assert train_epochs == ["0", "1"]
    history = load_checkpoint(folder / "checkpoints" / "last.ckpt")["history"]
    assert len(history["val"]) == 2 and history["val"][0]["acc"] == float(rows["0"]["val/acc"])


@pytest.mark.slow
def test_sigint_stops_at_a_batch_boundary_and_leaves_a_checkpoint(tmp_path):
    """Ctrl+C is turned into Lightning's SIGTERM path: the step finishes, then it stops."""
    proc = start(LONGER, tmp_path)
    output = stop_in_epoch_2(proc, signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, output
    folder = single_run_dir(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", output
    assert "Interrupted by SIGINT at epoch 1" in summary["error"]
    assert f"moe-exp resume={folder}" in summary["error"]
    checkpoint = load_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert checkpoint["epoch"] == 1 and "ExactResume" in checkpoint["callbacks"]


def test_a_record_killed_outright_keeps_its_time_and_a_resume_adds_to_it(tmp_path, monkeypatch):
    """What a SIGKILL leaves is the record's last write: it holds the wall time so far, and
    a resumed record starts from it and says so."""
    from moe_exp.app import record as record_module
    from moe_exp.app.record import RunRecord

    clock = iter([100.0, 100.0, 160.0, 500.0, 500.0, 530.0]).__next__  # each write reads it
    monkeypatch.setattr(record_module.time, "perf_counter", clock)
    first = RunRecord(tmp_path, ["seed=1"])  # starts at 100
    first.update(epochs=1)  # an epoch end at 160, then the process is killed
    killed = json.loads((tmp_path / "summary.json").read_text())
    assert killed["status"] == "running" and killed["wall_time_s"] == 60.0
    resumed = RunRecord(tmp_path, ["seed=1"], resume=True)  # starts at 500
    resumed.finish("completed")  # at 530
    done = json.loads((tmp_path / "summary.json").read_text())
    assert done["resumes"] == 1 and done["wall_time_s"] == 90.0  # 60 s + 30 s
