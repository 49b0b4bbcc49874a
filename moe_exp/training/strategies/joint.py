"""Joint training: gate and experts end to end by backprop (Jacobs et al. 1991)."""

from __future__ import annotations

from typing import Any


class JointStrategy:
    """Gate and experts trained together, end to end."""

    def fit(self, trainer: Any, module: Any, datamodule: Any, ckpt_path: str | None = None) -> None:
        """Train; ``ckpt_path`` resumes from a checkpoint (every strategy takes it)."""
        from moe_exp.training.adapters import lightning_data

        trainer.fit(module, datamodule=lightning_data(datamodule), ckpt_path=ckpt_path)
