"""Objects of one run from its config: the datamodule and the LightningModule around the
configured model (also used by tests, benchmarks and notebooks). Expert surgery
(``surgery.*``, moe_exp/training/surgery.py) is applied here, between building the model and
wrapping it, so every strategy trains the operated mixture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_exp.app.config import instantiate
from moe_exp.errors import ConfigError


def build_components(cfg: DictConfig) -> tuple[Any, Any]:
    """The datamodule (set up) and the LightningModule wrapping the configured model."""
    from moe_exp.training.module import MoEClassifierModule

    surgery, new_expert = _surgery(cfg)  # before the data, so a typo there fails at once
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    expert, router = instantiate(cfg.expert), instantiate(cfg.gate)
    model = instantiate(
        cfg.model,
        in_shape=datamodule.in_shape,
        num_classes=datamodule.num_classes,
        num_experts=cfg.experts,
        expert=expert,
        router=router,
        regularizers=instantiate(cfg.get("regularizer")) or {},
    )
    frozen = []
    if surgery is not None:
        frozen = surgery.apply(
            model, expert, router, datamodule.in_shape, datamodule.num_classes, new_expert
        )
    module = MoEClassifierModule(
        model, datamodule.num_classes, latents=datamodule.latent_spec(), **cfg.optim
    )
    module.frozen_modules = frozen
    return datamodule, module


def _surgery(cfg: DictConfig) -> tuple[Any, Any]:
    """The configured surgery and its new expert kind, checked; (None, None) when absent
    or inactive."""
    from moe_exp.training.surgery import Surgery

    node = cfg.get("surgery")
    if node is None:
        return None, None
    surgery = Surgery(**OmegaConf.to_container(node, resolve=True))
    if not surgery.active:
        return None, None
    return surgery, _expert_option(surgery.expert) if surgery.expert else None


def _expert_option(name: str) -> Any:
    """The partial of an option of the ``expert`` group, by name (``surgery.expert=mlp``)."""
    from moe_exp.app.compose import config_dir

    folder = Path(config_dir()) / "expert"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"surgery.expert={name!r} is not one of {options}")
    return instantiate(OmegaConf.load(path))
