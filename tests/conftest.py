import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from moe_exp.app.compose import compose, config_dir

CLI = str(Path(sys.executable).parent / "moe-exp")
# A tiny, fast run: small data, one epoch, no checkpoint-worthy training.
QUICK = ["experiment=quick"]
# The same as overrides, for presets that take the experiment slot themselves
QUICK_KEYS = [
    f"{section}.{key}={value}"
    for section, values in OmegaConf.load(Path(config_dir()) / "experiment" / "quick.yaml").items()
    for key, value in values.items()
]
# Smaller still, on one thread, without the pictures: in-process fits of a few batches.
TINY_DATA = ["data.n_train=256", "data.n_val=128", "data.n_test=128"]
TINY = [*QUICK, *TINY_DATA, "threads=1", "plots=false"]


def compose_config(overrides=()):
    return compose(list(overrides))


def seeded_build(cfg, run_dir: Path, seed: int = 0):
    """(datamodule, module, trainer) for an in-process fit: built after seeding, with the
    run's own Trainer (loggers, checkpoints) writing into ``run_dir``."""
    import torch

    from moe_exp.app.build import build_components
    from moe_exp.app.run import make_trainer

    torch.manual_seed(seed)
    datamodule, module = build_components(cfg)
    return datamodule, module, make_trainer(cfg, run_dir)


def config_options() -> list[tuple[str, str]]:
    """Every (group, option) pair under conf/."""
    root = Path(config_dir())
    return sorted(
        (group.name, option.stem)
        for group in root.iterdir()
        if group.is_dir() and not group.name.startswith(("_", "."))
        for option in group.glob("*.yaml")
    )


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def run_app(*args: str, cwd: Path, program: str = "moe-exp") -> SimpleNamespace:
    """A console script's own ``main()`` in this process (``moe-exp`` or ``moe-exp-eval``):
    the same Hydra app, checks and error path as :func:`run_cli`, without a new interpreter
    importing torch and Lightning again. The process's torch threads, cwd and argv are
    restored; what needs a process of its own (signals, DDP, the installed script) keeps
    :func:`run_cli`."""
    import torch

    from moe_exp.app import cli, evaluate

    main = {"moe-exp": cli.main, "moe-exp-eval": evaluate.main}[program]
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), torch.get_num_threads())
    full_error = os.environ.pop("HYDRA_FULL_ERROR", None)
    code = 0
    sys.argv = [program, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv, cwd_before, threads = saved
        os.chdir(cwd_before)
        torch.set_num_threads(threads)
        if full_error is not None:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def single_run_dir(root: Path) -> Path:
    """The folder of the one run a test started under ``root`` (its cwd)."""
    (summary,) = root.glob("outputs/runs/*/*/summary.json")
    return summary.parent


def single_sweep_dir(root: Path) -> Path:
    """The folder of the one multirun a test started under ``root`` (its cwd)."""
    (sweep,) = root.glob("outputs/multiruns/*/*")
    return sweep


@pytest.fixture
def cli(tmp_path):
    return lambda *args, **kw: run_cli(*args, cwd=tmp_path, **kw)


@pytest.fixture
def app(tmp_path):
    """The CLI run in this process (see :func:`run_app`), in ``tmp_path``."""
    return lambda *args: run_app(*args, cwd=tmp_path)


@pytest.fixture(scope="session")
def quick_sweep(tmp_path_factory) -> Path:
    """One real 2×2 multirun (gate × seed), shared by the tests that read sweeps."""
    root = tmp_path_factory.mktemp("sweep")
    out = run_app(
        "-m", *QUICK, *TINY_DATA, "plots=false", "gate=topk,noisy_topk", "seed=0,1", cwd=root
    )
    assert out.returncode == 0, out.stderr
    return single_sweep_dir(root)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The folder of one real, tiny, completed training run, shared by the tests that read
    a finished run (load, evaluate, routing table). Tests must not write into it."""
    root = tmp_path_factory.mktemp("tiny_run")
    out = run_app(*TINY, cwd=root)
    assert out.returncode == 0, out.stderr
    return single_run_dir(root)
