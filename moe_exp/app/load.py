"""Load a trained mixture in Python, without Hydra: ``moe_exp.load(path)``.

``path`` is a run folder (its ``checkpoints/best.ckpt``) or a ``.ckpt`` file alone. A
checkpoint carries the run's resolved config and input shape (``checkpoint["moe_exp"]``), so
a copied ``best.ckpt`` rebuilds its model anywhere; a checkpoint of an older run without them
is read with the ``config.yaml`` of the run folder it lies in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_exp.errors import MoeExpError


def _checkpoint_path(path: Path) -> Path:
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise MoeExpError(f"{path} holds no checkpoints/best.ckpt or last.ckpt: not a run folder")
    if not path.is_file():
        raise MoeExpError(f"{path} does not exist: give a run folder or a .ckpt file")
    return path


def _description(checkpoint: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """The checkpoint's own description, else one rebuilt from its run folder's config."""
    if "moe_exp" in checkpoint:
        return checkpoint["moe_exp"]
    saved = ckpt.parent.parent / "config.yaml"
    if not saved.is_file():
        raise MoeExpError(
            f"{ckpt} does not say what it is (a checkpoint from before checkpoints carried "
            f"their config) and {saved} is missing: load it from its run folder"
        )
    from moe_exp.app.config import instantiate

    cfg = OmegaConf.load(saved)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "in_shape": list(datamodule.in_shape),
        "num_classes": datamodule.num_classes,
    }


def load(path: str | Path) -> tuple[Any, DictConfig]:
    """(model in eval mode, its run's config). ``model(x)`` returns (log-probabilities,
    [routing record per MoE layer]). The weights are read with ``weights_only=True`` and
    shape-checked: a model that no longer matches fails naming the keys that differ."""
    from moe_exp.app.build import build_model
    from moe_exp.training.checkpoints import check_fits, load_checkpoint

    ckpt = _checkpoint_path(Path(path).expanduser())
    checkpoint = load_checkpoint(ckpt)
    described = _description(checkpoint, ckpt)
    cfg = OmegaConf.create(described["config"])
    experts = checkpoint.get("experts")
    if experts and len(experts) != cfg.experts:  # expert surgery changed the count
        cfg.experts = len(experts)
    model = build_model(cfg, tuple(described["in_shape"]), int(described["num_classes"]))
    state = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    check_fits(state, model.state_dict(), ckpt)
    model.load_state_dict(state)
    return model.eval(), cfg
