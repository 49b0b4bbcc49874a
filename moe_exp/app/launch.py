"""Launch checks: a -m sweep must not start script-launching DDP, which re-runs the sweep.

Lightning's ``ddp`` starts its other processes by re-running ``sys.argv``; under a Hydra
``-m`` sweep each child would start the whole sweep again (lightning-hydra-template #393,
Lightning #11300). Only Hydra and OmegaConf are imported unless a strategy node names a
class, which is then imported to see whether it is Lightning's DDPStrategy.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moe_exp.errors import ConfigError


def _is_ddp(target: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    from moe_exp.app.components import Unimportable, locate

    try:
        cls = locate(str(target))
    except Unimportable:
        return False
    return isinstance(cls, type) and issubclass(cls, DDPStrategy)


def strategy_launches_scripts(trainer: Any) -> bool:
    """Whether the trainer's strategy is DDP that starts its other processes by re-running
    the command line (Lightning's default ``ddp``: the subprocess-script launcher), with more
    than one process. ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` start them in-process."""
    if not isinstance(trainer, DictConfig):
        return False
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        method = strategy.get("start_method", "popen")
        scripted = method in (None, "popen") and _is_ddp(strategy.get("_target_"))
    else:
        name = str(strategy or "auto")
        # "auto" picks ddp (the script launcher) for several devices
        scripted = (name == "auto" or name.startswith("ddp")) and not any(
            m in name for m in ("spawn", "fork", "notebook")
        )
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    on_cpu = str(trainer.get("accelerator", "auto")) == "cpu"
    single = (devices == 1 or (devices == "auto" and on_cpu)) and nodes == 1
    return scripted and not single


def check_launch(cfg: DictConfig, multirun: bool, launcher_target: str) -> None:
    """Fail before anything heavy when a multirun job would re-launch the sweep: Lightning's
    script-launching DDP re-runs ``sys.argv`` in each child, which under ``-m`` starts the
    whole sweep again (lightning-hydra-template #393, Lightning #11300). SLURM (submitit)
    starts one task per device itself, so DDP there creates no processes."""
    if not (multirun and strategy_launches_scripts(cfg.get("trainer"))):
        return
    if launcher_target.endswith("SlurmLauncher"):
        return
    devices = cfg.trainer.get("devices")
    raise ConfigError(
        f"trainer.strategy={_strategy_name(cfg.trainer)} with trainer.devices={devices} cannot "
        "run inside a -m sweep on this launcher: Lightning's ddp re-runs the command line in "
        "each new process, which starts the whole sweep again. Use hydra/launcher=slurm (or "
        "submitit_slurm with hydra.launcher.tasks_per_node = trainer.devices, so SLURM starts "
        "the processes), or trainer.strategy=ddp_spawn for a local sweep, or drop -m."
    )


def _strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    return str(strategy)
