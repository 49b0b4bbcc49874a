"""Objects of one run from its config: the datamodule and the LightningModule around the
configured model (also used by tests, benchmarks and notebooks)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moe_exp.config import build


def build_components(cfg: DictConfig) -> tuple[Any, Any]:
    """The datamodule (set up) and the LightningModule wrapping the configured model."""
    from moe_exp.lit import MoEClassifierModule

    datamodule = build(cfg.data)
    datamodule.setup()
    model = build(
        cfg.model,
        in_shape=datamodule.in_shape,
        num_classes=datamodule.num_classes,
        num_experts=cfg.experts,
        expert=build(cfg.expert),
        router=build(cfg.gate),
        regularizers=build(cfg.get("regularizer")) or {},
    )
    module = MoEClassifierModule(
        model, datamodule.num_classes, cfg.experts, latents=datamodule.latent_spec(), **cfg.optim
    )
    return datamodule, module
