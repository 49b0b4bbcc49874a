"""Training strategies (the ``strategy=`` axis): how gate and experts are optimised.

``JointStrategy`` backpropagates the full loss through gate and experts together with
Lightning's automatic optimisation.
"""

from __future__ import annotations

import lightning as L


class JointStrategy:
    """Gate and experts trained together, end to end."""

    name = "joint"

    def fit(
        self, trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> None:
        trainer.fit(module, datamodule=datamodule)
