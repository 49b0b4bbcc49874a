"""Lightning callbacks of the runner: a progress bar fit for terminals and CI logs, and a
one-line epoch summary in the run's log."""

from __future__ import annotations

import logging
import sys

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

log = logging.getLogger("moe_exp")


class LineProgressBar(ProgressBar):
    """A progress bar for logs (CI, files): one line at each quarter of a training epoch,
    where a redrawing bar would leave a wall of carriage returns."""

    def __init__(self, marks: int = 4) -> None:
        super().__init__()
        self.marks = marks
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        total = self.total_train_batches
        if not self._enabled or not isinstance(total, int) or total <= 0:
            return
        done = batch_idx + 1
        if done == total or done * self.marks // total > batch_idx * self.marks // total:
            filled = round(20 * done / total)
            print(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} batches",
                flush=True,
            )


def progress_bar() -> ProgressBar:
    """A live bar in a terminal; quarter-epoch lines anywhere else."""
    return TQDMProgressBar() if sys.stdout.isatty() else LineProgressBar()


class EpochSummary(L.Callback):
    """Logs accuracy, loss and load balance once per epoch, so a log file tells the story."""

    KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/cv_load", "val/max_mean_load")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        parts = [f"{k}={float(metrics[k]):.4f}" for k in self.KEYS if k in metrics]
        log.info("epoch %d: %s", trainer.current_epoch, "  ".join(parts))
