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


def build_model(
    cfg: DictConfig, in_shape: Any, num_classes: int, expert: Any = None, router: Any = None
) -> Any:
    """The configured model (before any surgery) for inputs of ``in_shape``; ``expert`` and
    ``router`` are the config's partials unless given."""
    return instantiate(
        cfg.model,
        in_shape=in_shape,
        num_classes=num_classes,
        num_experts=cfg.experts,
        expert=expert or instantiate(cfg.expert),
        router=router or instantiate(cfg.gate),
        regularizers=instantiate(cfg.get("regularizer")) or {},
    )


def describe(cfg: DictConfig, in_shape: Any, num_classes: int) -> dict[str, Any]:
    """What a checkpoint carries to say what it is: enough to rebuild its model anywhere."""
    import moe_exp

    return {
        "version": moe_exp.__version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "in_shape": [int(s) for s in in_shape],
        "num_classes": int(num_classes),
    }


def build_components(cfg: DictConfig) -> tuple[Any, Any]:
    """The datamodule (set up, as Lightning takes it) and the LightningModule wrapping the
    configured model."""
    from moe_exp.training.adapters import lightning_data
    from moe_exp.training.module import MoEClassifierModule

    surgery, new_expert = _surgery(cfg)  # before the data, so a typo there fails at once
    datamodule = lightning_data(instantiate(cfg.data))
    datamodule.setup()
    in_shape, num_classes = datamodule.in_shape, datamodule.num_classes
    expert, router = instantiate(cfg.expert), instantiate(cfg.gate)
    model = build_model(cfg, in_shape, num_classes, expert, router)
    frozen = []
    if surgery is not None:  # new experts and a resized router from the same partials
        frozen = surgery.apply(model, expert, router, in_shape, num_classes, new_expert)
    module = MoEClassifierModule(model, num_classes, latents=datamodule.latent_spec(), **cfg.optim)
    module.frozen_modules = frozen
    module.old_experts = surgery.old_experts if surgery is not None else {}
    module.description = describe(cfg, in_shape, num_classes)
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
