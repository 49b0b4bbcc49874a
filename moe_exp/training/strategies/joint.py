"""Joint training: gate and experts end to end by backprop (Jacobs et al. 1991)."""

from __future__ import annotations

import lightning as L


class JointStrategy:
    """Gate and experts trained together, end to end."""

    def fit(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str | None = None,
    ) -> None:
        """Train; ``ckpt_path`` resumes from a checkpoint (every strategy takes it)."""
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
