"""Scale-out: parallel launchers with their CPU share, SLURM presets, the Optuna search,
DDP on two CPU processes, and the refusal of script-launching DDP inside a -m sweep."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from moe_exp.app.cli import parallel_jobs, thread_share
from moe_exp.app.launch import check_launch, strategy_launches_scripts
from moe_exp.errors import ConfigError
from tests.conftest import (
    QUICK,
    QUICK_KEYS,
    compose_config,
    run_cli,
    single_run_dir,
    single_sweep_dir,
)

REPO = Path(__file__).resolve().parents[2]
JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]


# -- thread shares ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_jobs", "cpus", "requested", "expected"),
    [
        (2, 2, 2, 1),  # two jobs on two CPUs: one thread each
        (-1, 8, 4, 1),  # -1 = one job per CPU
        (-2, 8, 4, 1),  # all CPUs but one: 7 jobs
        (2, 8, 2, 2),  # the request is below the share: kept
        (2, 8, 8, 4),  # capped at 8 // 2
        (16, 4, 2, 1),  # more jobs than CPUs: never below one
    ],
)
def test_joblib_jobs_get_their_share_of_the_cpus(n_jobs, cpus, requested, expected):
    launcher = OmegaConf.create({**JOBLIB, "n_jobs": n_jobs})
    assert thread_share(requested, launcher, cpus) == expected


def test_sequential_launchers_keep_the_requested_threads():
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.X"})
    assert parallel_jobs(basic, 8) == 1
    assert thread_share(4, basic, 2) == 4


@pytest.mark.slow
def test_a_joblib_sweep_runs_both_jobs_with_capped_threads(tmp_path):
    """~30 s here: two jobs in parallel, each importing torch in its own worker."""
    cpus = len(os.sched_getaffinity(0))
    out = run_cli(
        "-m",
        *QUICK,
        f"threads={cpus}",  # every CPU asked for: two parallel jobs must get half each
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    sweep = single_sweep_dir(tmp_path)
    done = summaries(sweep)
    assert [d["status"] for d in done] == ["completed", "completed"]
    assert [d["threads"] for d in done] == [max(1, cpus // 2)] * 2
    assert sorted(d["overrides"][-1] for d in done) == ["seed=0", "seed=1"]


# -- launcher presets ---------------------------------------------------------------------
def test_the_slurm_preset_asks_one_task_per_device(app):
    out = app(
        "--cfg",
        "all",
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        "--resolve",
    )
    assert out.returncode == 0, out.stderr
    launcher = yaml.safe_load(out.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu"
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 4
    assert launcher["nodes"] == 1 and launcher["timeout_min"] > 0


def test_the_parallel_preset_is_joblib_on_every_cpu(app):
    out = app("--cfg", "hydra", "hydra/launcher=parallel")
    launcher = yaml.safe_load(out.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == JOBLIB["_target_"] and launcher["n_jobs"] == -1


# -- DDP --------------------------------------------------------------------------------------
def test_trainer_presets_compose():
    ddp = compose_config(["trainer=ddp"]).trainer
    assert ddp.strategy.find_unused_parameters is True
    assert ddp.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert ddp.devices == 2 and ddp.max_epochs == 5  # the rest comes from trainer=default
    gpu = compose_config(["trainer=gpu"]).trainer
    assert gpu.accelerator == "gpu" and gpu.devices == 1


@pytest.mark.parametrize(
    ("overrides", "scripted"),
    [
        (["trainer=ddp"], True),
        (["trainer=ddp", "trainer.strategy.start_method=spawn"], False),
        (["trainer=ddp", "trainer.devices=1"], False),
        (["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"], True),
        (["trainer=default"], False),
        (["trainer.devices=2", "+trainer.strategy=ddp"], True),
        (["trainer.devices=2", "+trainer.strategy=ddp_spawn"], False),
        (["trainer.devices=2"], True),  # strategy auto picks ddp for several devices
    ],
)
def test_which_trainers_relaunch_the_command_line(overrides, scripted):
    assert strategy_launches_scripts(compose_config(overrides).trainer) is scripted


def test_ddp_in_a_local_sweep_is_refused_with_the_ways_out():
    cfg = compose_config(["trainer=ddp"])
    with pytest.raises(ConfigError) as err:
        check_launch(cfg, multirun=True, launcher_target="hydra.BasicLauncher")
    for hint in ("submitit_slurm", "tasks_per_node", "ddp_spawn", "trainer.devices=2"):
        assert hint in str(err.value)
    check_launch(cfg, multirun=False, launcher_target="hydra.BasicLauncher")  # single run: fine
    check_launch(cfg, multirun=True, launcher_target="x.submitit_launcher.SlurmLauncher")


def test_a_ddp_sweep_fails_fast_before_any_job(app, tmp_path):
    out = app("-m", *QUICK, "trainer=ddp", "seed=0,1")
    assert out.returncode != 0
    assert "re-runs the command line" in out.stderr and "submitit_slurm" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("outputs/multiruns/*/*/*/summary.json"))  # no job started


class RankMetrics(L.Callback):
    """Test helper run inside the DDP processes: each rank writes what it logged (synced by
    torchmetrics) and what it saw itself (its own shard of the data)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.labels: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.labels += batch[1].tolist()

    def on_train_end(self, trainer, module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        data = {"world": trainer.world_size, "labels": self.labels, "metrics": metrics}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    """Two gloo processes (Lightning's ddp, the command re-run per rank) train 3 batches each
    on their own shard of the data; each rank writes what it logged and what it saw."""
    root = tmp_path_factory.mktemp("ddp")
    pythonpath = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{pythonpath}"  # the children import tests/
    try:
        out = run_cli(
            *QUICK,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "threads=1",
            "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2",
            "+callbacks.rank_metrics._target_=tests.app.test_scaleout.RankMetrics",
            f"+callbacks.rank_metrics.out={root}",
            cwd=root,
        )
    finally:
        os.environ["PYTHONPATH"] = pythonpath
    assert out.returncode == 0, out.stderr
    data = json.loads((single_run_dir(root) / "summary.json").read_text())  # rank 0 alone writes it
    assert data["status"] == "completed" and data["epochs"] == 1
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_synchronises_the_logged_metrics(ddp_ranks):
    """Accuracy and loss are torchmetrics means, synchronised at compute: both ranks log the
    same values although each trained on different data (~25 s)."""
    assert [r["world"] for r in ddp_ranks] == [2, 2]
    assert len(ddp_ranks[0]["labels"]) == len(ddp_ranks[1]["labels"]) == 3 * 64
    assert ddp_ranks[0]["labels"] != ddp_ranks[1]["labels"]  # each rank has its own shard
    for key in ("train/acc", "train/loss", "train/ce", "val/acc", "val/loss"):
        assert ddp_ranks[0]["metrics"][key] == ddp_ranks[1]["metrics"][key], key


@pytest.mark.slow
def test_ddp_synchronises_the_routing_statistics(ddp_ranks):
    for key in ("train/cv_load", "train/load_e2", "train/nmi_label", "train/gate_entropy"):
        assert ddp_ranks[0]["metrics"][key] == ddp_ranks[1]["metrics"][key], key


# -- Optuna -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_optuna_search_preset_maximises_val_acc_with_sqlite_storage(tmp_path):
    """Two TPE trials of experiment=search_noisy_topk on the quick-sized data (~45 s)."""
    out = run_cli(
        "experiment=search_noisy_topk", *QUICK_KEYS, "hydra.sweeper.n_trials=2", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    sweep = single_sweep_dir(tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    assert set(result["best_params"]) == {
        "optim.lr",
        "experts",
        "k",
        "regularizer.importance.weight",
        "regularizer.load.weight",
    }
    done = summaries(sweep)
    assert [d["status"] for d in done] == ["completed", "completed"]
    assert result["best_value"] == max(d["val/acc"] for d in done)
    assert (sweep / "optuna.db").stat().st_size > 0


@pytest.mark.slow
def test_a_diverged_trial_does_not_stop_the_search(tmp_path):
    """Grid over a sane and an absurd learning rate: the absurd one diverges, is recorded as
    such and told to Optuna as the worst value; the search ends with the sane one best."""
    out = run_cli(
        "-m",  # needed for a search dimension given on the command line
        "experiment=search_noisy_topk",
        *QUICK_KEYS,
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.params=null",
        "optim.lr=choice(0.003,1000000000.0)",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    sweep = single_sweep_dir(tmp_path)
    statuses = sorted(d["status"] for d in summaries(sweep))
    assert statuses == ["completed", "diverged"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"optim.lr": 0.003}


def test_gpu_trainer_without_a_gpu_fails_clearly(app):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: trainer=gpu is valid here")
    out = app(*QUICK, "trainer=gpu")
    assert out.returncode != 0
    assert "trainer.accelerator=gpu but no CUDA GPU is visible" in out.stderr
    assert "Traceback" not in out.stderr
