"""Lightning callbacks of the runner: a progress bar fit for terminals and CI logs, and the
routing-collapse alarm."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

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


class CollapseAlarm(L.Callback):
    """Warns when routing collapses: an expert dies, or one expert takes more than
    ``dominant_share`` of the routing weight, for ``patience`` validation epochs in a row.

    Each alarm is logged as a warning, as ``val/collapse_alarm`` in the loggers, and as a line
    in ``events.jsonl`` in the run folder.
    """

    def __init__(self, run_dir: Path, patience: int = 2, dominant_share: float = 0.5) -> None:
        self.events_path = Path(run_dir) / "events.jsonl"
        self.patience = patience
        self.dominant_share = dominant_share
        self.streak = 0
        self.events = 0

    def _problems(self, metrics: dict[str, float]) -> list[str]:
        problems = []
        for key, dead in metrics.items():
            if not key.endswith("dead_experts"):
                continue
            prefix = key[: -len("dead_experts")]
            shares = [
                v
                for k, v in metrics.items()
                if k.startswith(f"{prefix}importance_e") and "/" not in k[len(prefix) :]
            ]
            if dead > 0:
                problems.append(f"{prefix}{int(dead)} dead expert(s)")
            if shares and max(shares) > self.dominant_share:
                problems.append(f"{prefix}one expert takes {max(shares):.0%} of the routing weight")
        return problems

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        history = getattr(module, "history", {}).get("val") or []
        if not history or trainer.sanity_checking:
            return
        problems = self._problems(history[-1])
        self.streak = self.streak + 1 if problems else 0
        alarm = self.streak >= self.patience
        module.log("val/collapse_alarm", float(alarm))
        if alarm and self.streak == self.patience:
            self.events += 1
            message = (
                f"routing collapse for {self.streak} epochs (epoch {trainer.current_epoch}):"
                f" {'; '.join(problems)}"
            )
            log.warning(message)
            with self.events_path.open("a") as f:
                f.write(
                    json.dumps(
                        {"event": "collapse", "epoch": trainer.current_epoch, "problems": problems}
                    )
                    + "\n"
                )
