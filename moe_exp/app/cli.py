"""The ``moe-exp`` console script: a Hydra app over the top-level ``conf/`` tree.

Only Hydra is imported here, so ``--help`` and ``--cfg job`` answer fast. What happens
before a job trains lives here because it depends on how Hydra launched the job:
``resume=DIR`` is rewritten before Hydra starts (:mod:`moe_exp.app.resume`); parallel
launchers (joblib) cap each job's torch threads at its share of the CPUs; script-launching
DDP in a ``-m`` sweep is refused (:mod:`moe_exp.app.launch`); and inside an Optuna search a
diverged trial reports the worst value instead of stopping the search.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from moe_exp.app.compose import config_dir
from moe_exp.app.help import help_text, wants_help
from moe_exp.app.launch import check_launch
from moe_exp.app.resume import is_resume_override, resume_argv


# -- launchers ------------------------------------------------------------------------------
def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_jobs(launcher: Any, cpus: int) -> int:
    """How many jobs a launcher runs at once on this machine (1 for sequential ones)."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if not target.endswith("JoblibLauncher"):
        return 1
    n = launcher.get("n_jobs", -1)
    n = int(n) if n is not None else 1
    if n < 0:  # joblib: -1 = all CPUs, -2 = all but one, ...
        n = cpus + 1 + n
    return max(1, n)


def thread_share(requested: int, launcher: Any, cpus: int | None = None) -> int:
    """The torch threads a job may use: its request, at most its share of the CPUs."""
    cpus = cpus or cpu_count()
    jobs = parallel_jobs(launcher, cpus)
    return requested if jobs <= 1 else max(1, min(requested, cpus // jobs))


def _worst(sweeper: Any) -> float | list[float]:
    """The value an Optuna search gets for a diverged trial: the worst for each direction."""
    direction = sweeper.get("direction", "minimize")
    names = [direction] if isinstance(direction, str) else list(direction)
    values = [-math.inf if str(d).lower().startswith("max") else math.inf for d in names]
    return values[0] if isinstance(direction, str) else values


class LaunchGuard(Callback):
    """Hydra callback before a run or a multirun: the run (or sweep) folder is created here,
    where a folder that cannot be made ends the command with one message (Hydra would print
    its own traceback); a multirun also refuses script-launching DDP before any job starts
    (and Optuna's sqlite storage lives in the sweep folder, opened before any job makes it).
    Hydra turns exceptions of callbacks into warnings, so a refusal exits here."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make_folder(config.hydra.run.dir, "the run folder")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher._target_", default="") or ""
        check_launch(config, multirun=True, launcher_target=str(launcher))
        _make_folder(config.hydra.sweep.dir, "the sweep folder")


def _make_folder(path: str, what: str) -> None:
    from moe_exp.errors import WriteError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"Error: {WriteError.of(err, what, verb='create')}", file=sys.stderr)
        raise SystemExit(1) from None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float | list[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # again per job: a sweep over trainer options makes DDP in a job, not in the base config
    check_launch(cfg, multirun=multirun, launcher_target=str(hc.launcher.get("_target_", "")))
    notes: dict[str, Any] = {}
    threads = thread_share(int(cfg.threads), hc.launcher)
    if threads != cfg.threads:
        notes["threads_capped"] = (
            f"threads={cfg.threads} capped to {threads}: {parallel_jobs(hc.launcher, cpu_count())}"
            f" parallel jobs share {cpu_count()} CPUs"
        )
        with open_dict(cfg):
            cfg.threads = threads

    from moe_exp.app.run import run
    from moe_exp.errors import DivergedError

    overrides = [o for o in hc.overrides.task if not is_resume_override(o)]
    try:
        return run(cfg, Path(hc.runtime.output_dir), overrides, notes=notes)
    except DivergedError:
        sweeper = hc.sweeper
        if multirun and str(sweeper.get("_target_", "")).endswith("OptunaSweeper"):
            return _worst(sweeper)  # recorded as diverged; the search goes on
        raise


# Hydra's flags that take no value: argparse reads overrides only before the first of them,
# so ``moe-exp gate=topk -m experts=4,8`` would be refused; they are moved to the front.
VALUELESS_FLAGS = ("-m", "--multirun", "-r", "--run", "--resolve", "--help", "-h", "--hydra-help")


def flags_first(argv: list[str]) -> list[str]:
    """The command line with Hydra's value-less flags before the overrides."""
    rest = argv[1:]
    flags = [a for a in rest if a in VALUELESS_FLAGS]
    return [argv[0], *flags, *(a for a in rest if a not in VALUELESS_FLAGS)]


def main() -> None:
    sys.argv = flags_first(resume_argv(sys.argv))
    try:
        text = help_text(sys.argv) if wants_help(sys.argv) else None
        if text is not None:
            print(text)
            return
        _app()
    except BrokenPipeError:  # `moe-exp --help | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nothing more may reach the pipe)


if __name__ == "__main__":
    main()
