"""Lightning callbacks of the runner: a progress bar fit for terminals and CI logs, the
routing-collapse alarm, and what makes a killed run resumable (a checkpoint at the signal,
and the exact data order and random state to continue from it)."""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

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
    """Warns when routing collapses: an expert dies (gets almost no inputs, or gets inputs but
    almost no combine weight), or one expert takes more than ``dominant_share`` of the
    routing weight, for ``patience`` validation epochs in a row.

    Each alarm is logged as a warning, as ``val/collapse_alarm`` in the loggers, and as a line
    in ``events.jsonl`` in the run folder.
    """

    def __init__(self, run_dir: Path, patience: int = 2, dominant_share: float = 0.5) -> None:
        self.events_path = Path(run_dir) / "events.jsonl"
        self.patience = patience
        self.dominant_share = dominant_share
        self.streak = 0
        self.events = 0
        self.validations_seen = 0

    # the streak survives a resume (it is part of the checkpoint)
    def state_dict(self) -> dict[str, int]:
        return {"streak": self.streak, "events": self.events, "seen": self.validations_seen}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.streak = int(state_dict.get("streak", 0))
        self.events = int(state_dict.get("events", 0))
        self.validations_seen = int(state_dict.get("seen", 0))

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
            by_load = metrics.get(f"{prefix}dead_experts_load", dead)
            by_weight = metrics.get(f"{prefix}dead_experts_weight", 0.0)
            if by_load > 0:
                problems.append(f"{prefix}{int(by_load)} expert(s) dead by load (almost no inputs)")
            if by_weight > by_load:
                problems.append(
                    f"{prefix}{int(by_weight)} expert(s) dead by weight (they receive inputs "
                    "but carry almost none of the combine weight)"
                )
            if shares and max(shares) > self.dominant_share:
                problems.append(f"{prefix}one expert takes {max(shares):.0%} of the routing weight")
        return problems

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        history = getattr(module, "history", {}).get("val") or []
        # count validations, not epochs: an epoch without one (check_val_every_n_epoch,
        # val_check_interval) must not count the last one again
        if len(history) <= self.validations_seen or trainer.sanity_checking:
            return
        self.validations_seen = len(history)
        problems = self._problems(history[-1])
        self.streak = self.streak + 1 if problems else 0
        alarm = self.streak >= self.patience
        module.log("val/collapse_alarm", float(alarm))
        if alarm and self.streak == self.patience:
            self.events += 1
            message = (
                f"routing collapse for {self.streak} validations in a row"
                f" (epoch {trainer.current_epoch}):"
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


class EveryEpoch(L.Callback):
    """Calls ``fn(trainer)`` at the end of every training epoch (the run record's progress)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.fn(trainer)


# -- resumable runs ------------------------------------------------------------------------
LAST = "last.ckpt"  # ModelCheckpoint(save_last=True) writes the same name at each epoch end


class InterruptCheckpoint(L.Callback):
    """Leaves ``checkpoints/last.ckpt`` when a run is stopped by SIGTERM or SIGINT.

    Lightning (2.x) turns SIGTERM into a flag that ends training at the next batch boundary
    with ``SIGTERMException`` and calls ``on_exception``; this callback saves the checkpoint
    there. SIGINT (Ctrl+C) would raise KeyboardInterrupt wherever the code happens to be,
    possibly half way through an optimiser step, so during ``fit`` the first SIGINT is
    re-sent as SIGTERM (a second one interrupts at once, as usual). Errors (a diverged loss,
    a bug) save nothing: such a state is not worth continuing.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "checkpoints" / LAST
        self.signal_name: str | None = None
        self.where = ""
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signal_name = "SIGINT"
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        signal.raise_signal(signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exc: BaseException):
        self._restore_sigint()
        if not isinstance(exc, (SIGTERMException, KeyboardInterrupt)):
            return
        self.signal_name = self.signal_name or (
            "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        )
        loop = trainer.fit_loop.epoch_loop.batch_progress.current
        self.where = (
            f"epoch {trainer.current_epoch}, batch {loop.completed}/{trainer.num_training_batches}"
        )
        trainer.save_checkpoint(self.path)


def _generators(loader: DataLoader) -> list[torch.Generator]:
    """The torch.Generators that decide a loader's order and augmentation, in a fixed order:
    its sampler's (and its batch sampler's inner sampler's) and its dataset transform's."""
    found: list[torch.Generator] = []
    seen: set[int] = set()
    holders = [loader.batch_sampler, loader.sampler, getattr(loader.dataset, "transform", None)]
    for holder in holders:
        inner = getattr(holder, "sampler", None)
        for obj in (holder, inner):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator) and id(g) not in seen:
                seen.add(id(g))
                found.append(g)
    return found


class _ReplayLoader(DataLoader):
    """A DataLoader whose next iteration can start from saved generator states and skip the
    batches an interrupted epoch had already trained on, by drawing them again (so the
    order and any augmentation randomness match exactly). Set by :class:`ExactResume`."""

    _replay: dict[str, Any] | None = None
    _epoch_start: list[torch.Tensor] | None = None
    _owner: ExactResume | None = None

    def __iter__(self) -> Iterator[Any]:
        if self._owner is not None:
            self._owner._loader = self  # Lightning may have re-created the loader (DDP)
        generators = _generators(self)
        replay, self._replay = self._replay, None
        if replay is not None:
            for g, state in zip(generators, replay["generators"], strict=True):
                g.set_state(state)
        self._epoch_start = [g.get_state() for g in generators]
        iterator = super().__iter__()
        for _ in range(replay["batches"] if replay else 0):
            next(iterator)
        return iterator


class ExactResume(L.Callback):
    """Saves in every checkpoint what a resumed run needs to continue bit for bit: the
    global random states (torch, numpy, random; CUDA where used) and the training data's
    position (generator states at the epoch's start and the batches already trained).

    Given the state of the checkpoint a run resumes from (``restore``), it replays it: the
    train loader's next epoch starts where the interrupted one stood (its first iteration
    may come before Lightning restores the checkpoint, from ``estimated_stepping_batches``,
    hence the state comes in through the constructor), and the random states are set just
    before the first batch trained after the resume.

    Loaders' own iterators stop drawing a seed from the global random state (each gets a
    private generator; it only seeds worker processes), so that state depends on the
    training steps alone, wherever Lightning creates an iterator.
    """

    def __init__(self, restore: dict[str, Any] | None = None) -> None:
        self.restore = restore
        self._rng_pending = restore.get("rng") if restore else None
        self._loader: _ReplayLoader | None = None
        self._trainer: L.Trainer | None = None

    @staticmethod
    def state_in(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        return (checkpoint.get("callbacks") or {}).get(ExactResume.__qualname__)

    # data
    def _wrap(self, make: Any, train: bool) -> Any:
        def loader() -> Any:
            dl = make()
            if not isinstance(dl, DataLoader):
                return dl
            if dl.generator is None:
                dl.generator = torch.Generator().manual_seed(0)
            if train and type(dl) is DataLoader:
                dl.__class__ = _ReplayLoader
                dl._replay = self.restore.get("data") if self.restore else None
                dl._epoch_start = [g.get_state() for g in _generators(dl)]
                dl._owner = self
                self._loader = dl
            return dl

        return loader

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        dm = trainer.datamodule
        if dm is None or getattr(dm, "_moe_exact_resume", False):
            return
        for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
            setattr(dm, name, self._wrap(getattr(dm, name), train=name == "train_dataloader"))
        dm._moe_exact_resume = True

    # random state
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if self._rng_pending is not None:
            _set_rng(self._rng_pending)
            self._rng_pending = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Lightning skips ``on_train_epoch_start`` when it restarts mid-epoch; strategies and
        the module prepare each epoch there (stage, timers), so call it for them."""
        if self.restore is not None and trainer.fit_loop.restarted_mid_epoch:
            module.on_train_epoch_start()
            for callback in trainer.callbacks:
                if callback is not self:
                    callback.on_train_epoch_start(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": _get_rng()}
        dl = self._loader
        if dl is not None and dl._epoch_start is not None and self._trainer is not None:
            done = self._trainer.fit_loop.epoch_loop.batch_progress.current.completed
            total = self._trainer.num_training_batches
            if done < total:  # inside an epoch: replay it from its start
                state["data"] = {"generators": dl._epoch_start, "batches": done}
            else:  # at an epoch's end: the next epoch starts from the current states
                now = [g.get_state() for g in _generators(dl)]
                state["data"] = {"generators": now, "batches": 0}
        return state


def _get_rng() -> dict[str, Any]:
    """Random states as tensors and plain lists (a checkpoint must load with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "random": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
