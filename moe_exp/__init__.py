"""moe-exp: a Hydra + Lightning experiment runner for Mixture-of-Experts image classification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load(path: str | Path) -> tuple[Any, Any]:
    """(model in eval mode, config) of a run folder or a ``.ckpt`` file: see
    :func:`moe_exp.app.load.load`."""
    from moe_exp.app.load import load as load_run

    return load_run(path)
