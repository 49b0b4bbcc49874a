"""One run: validate → build data, model and trainer → train with the strategy → test →
measure (cost, expert similarity, pictures) → write the run record. Heavy imports live
here, off the path of ``--help``.

A run with ``resume=<its folder>`` (set up by the CLI) continues from
``checkpoints/last.ckpt`` in that folder: the checkpoint is read with ``weights_only=True``
and checked against the model first, so a corrupted file or one from another architecture
fails with the offending key and both shapes, not a stack trace.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_exp.app.config import instantiate, validate
from moe_exp.app.loggers import close_wandb
from moe_exp.app.record import RunRecord
from moe_exp.app.resume import carry_csv_rows, check_resume_folder, first_epoch_after
from moe_exp.errors import ConfigError, DivergedError, WriteError

log = logging.getLogger("moe_exp")
PROBE_INPUTS = 256  # test inputs used for FLOP counting and expert similarity
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as shells report them


class Interrupted(Exception):
    """Training stopped on a signal after saving ``checkpoints/last.ckpt``."""

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


def global_rank() -> int:
    """This process's rank in a distributed run (0 otherwise), from the launchers' variables,
    read in Lightning's order (its ``rank_zero_only.rank``) without importing Lightning, so a
    configuration error fails in a fraction of a second."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if (rank := os.environ.get(key)) is not None:
            return int(rank)
    return 0


def run(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> float | list[float]:
    """Train and evaluate one configuration in ``run_dir``; returns the ``objective`` metric
    (validation accuracy by default; a list for a multi-objective search)."""
    run_dir = Path(run_dir)
    resume = cfg.get("resume")
    rank_zero = global_rank() == 0
    if resume:  # before the record: a refused resume leaves the run's files as they were
        check_resume_folder(Path(resume), run_dir, cfg)
    record = RunRecord(run_dir, overrides, resume=bool(resume), enabled=rank_zero)
    record.update(
        task_name=cfg.get("task_name"),
        tags=[str(t) for t in cfg.get("tags") or []],
        **({"debug_run": cfg.debug_run} if cfg.get("debug_run") else {}),
        **(notes or {}),
    )
    try:
        validate(cfg, overrides or ())
        if rank_zero:
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        results = _train_and_test(cfg, run_dir, record, bool(resume))
    except DivergedError as err:
        _finish(record, "diverged", str(err))
        raise
    except OSError as err:
        if err.errno not in WriteError.ERRNOS:
            _finish(record, "failed", f"{type(err).__name__}: {err}")
            raise
        failure = WriteError.of(err)
        _finish(record, "failed", f"WriteError: {failure}")
        raise failure from err
    except BaseException as err:
        stop = _as_interruption(err, run_dir)
        if stop is None:
            _finish(record, "failed", f"{type(err).__name__}: {err}")
            raise
        _finish(record, "interrupted", str(stop))
        log.warning("%s", stop)
        raise SystemExit(EXIT_CODES.get(stop.signal_name, 1)) from err
    finally:
        close_wandb(failed=record.data["status"] not in ("completed", "debug"))
    if record.data["status"] == "debug":
        log.info("debug run (%s) done: nothing measured or recorded → %s", cfg.debug_run, run_dir)
        return math.nan
    if not rank_zero:
        return objective_value(cfg, results)
    cv_load = [v for k, v in results.items() if k.startswith("test/") and k.endswith("cv_load")]
    balance = f" test/cv_load={', '.join(f'{v:.3f}' for v in cv_load)}" if cv_load else ""
    log.info(
        "done in %.1f s: test/acc=%.4f val/acc=%.4f%s → %s",
        record.data["wall_time_s"],
        results.get("test/acc", float("nan")),
        results.get("val/acc", float("nan")),
        balance,
        run_dir,
    )
    return objective_value(cfg, results)


def _finish(record: RunRecord, status: str, error: str) -> None:
    """End the record; where even that cannot be written (a full disk), the summary stays
    the last complete one (written atomically) and the log says why."""
    try:
        record.finish(status, error=error)
    except OSError as err:
        log.error("summary.json could not be updated to %s: %s", status, err)


def _as_interruption(err: BaseException, run_dir: Path) -> Interrupted | None:
    """A signal that stopped the run, as an Interrupted (None for real errors). Outside
    training (evaluation) Lightning raises SIGTERMException / exits on KeyboardInterrupt."""
    if isinstance(err, Interrupted):
        return err
    sigint = isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)
    )
    sigterm = False
    if "lightning.pytorch" in sys.modules:  # else no SIGTERMException can have been raised
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        sigterm = isinstance(err, SIGTERMException)
    if not (sigint or sigterm):
        return None
    name = "SIGINT" if sigint else "SIGTERM"
    return Interrupted(
        name,
        f"Interrupted by {name} outside training (setup or evaluation). Continue with: "
        f"moe-exp resume={run_dir}",
    )


def objective_value(cfg: DictConfig, results: Mapping[str, Any]) -> float | list[float]:
    """The metric(s) named by ``objective``: what a sweeper (Optuna) optimises."""
    objective = cfg.get("objective") or "val/acc"
    names = [objective] if isinstance(objective, str) else list(objective)
    missing = [n for n in names if n not in results]
    if missing:
        known = ", ".join(sorted(k for k in results if k.startswith(("val/", "test/"))))
        raise ConfigError(f"objective={', '.join(missing)} is not a metric of this run: {known}")
    values = [float(results[n]) for n in names]
    return values[0] if isinstance(objective, str) else values


def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # A run folder always holds files (summary.json, .hydra/) before the loggers start, and a
    # resumed one its checkpoints and metrics.csv rows (carried over, see carry_csv_rows).
    warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not.*")
    # ExactResume replays the data order of an epoch stopped half way.
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before.*")
    # The module moves its batches itself (a tuple of tensors straight to the device); the
    # datamodules define no transfer of their own for it to override.
    warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")


def make_callbacks(
    cfg: DictConfig, run_dir: Path, resume_from: Mapping[str, Any] | None = None
) -> list[Any]:
    """The run's Lightning callbacks: exact resume (always), then every ``callbacks`` node
    that is not null, each given the run folder where it takes one (``run_dir``, or
    ModelCheckpoint's ``dirpath`` when unset)."""
    import inspect

    from hydra.utils import get_object
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moe_exp.training.callbacks import ExactResume

    callbacks = [ExactResume(ExactResume.state_in(resume_from) if resume_from else None)]
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        target = get_object(node._target_)
        given: dict[str, Any] = {}
        if "run_dir" in inspect.signature(target).parameters and "run_dir" not in node:
            given["run_dir"] = str(run_dir)
        checkpoints = isinstance(target, type) and issubclass(target, ModelCheckpoint)
        if checkpoints and node.get("dirpath") is None:
            given["dirpath"] = str(run_dir / "checkpoints")
        callbacks.append(instantiate(node, **given))
    return callbacks


def make_trainer(
    cfg: DictConfig, run_dir: Path, resume_from: Mapping[str, Any] | None = None
) -> Any:
    """The Trainer with the run's loggers and callbacks; ``resume_from`` is the checkpoint a
    resumed run continues (its metrics.csv rows and exact-resume state are carried over)."""
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.loggers import CSVLogger

    # rank 0 alone: the CSV logger writes nothing on the others (its experiment is a dummy)
    carry = resume_from and global_rank() == 0
    rows = carry_csv_rows(run_dir, first_epoch_after(resume_from)) if carry else []
    loggers = [
        instantiate(node, save_dir=str(run_dir)) for node in (cfg.get("logger") or {}).values()
    ]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if rows and isinstance(logger, CSVLogger):
            logger.experiment.metrics.extend(rows)
            logger.save()  # on disk again now: a resumed run that fails must not lose them
    callbacks = make_callbacks(cfg, run_dir, resume_from)
    summary = any(isinstance(c, ModelSummary) for c in callbacks)
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        **({"enable_model_summary": True} if summary else {}),
    )


def eval_accuracy(module: Any, split: Any, batch_size: int = 1024) -> float:
    """Accuracy over a whole split in eval mode (no dropout, no noise, no augmentation): the
    training accuracy a generalisation gap should use; the epoch's running train/acc is
    taken with dropout on and while the weights move."""
    from moe_exp.measure.passes import accuracy

    return accuracy(module.model, split.images, split.labels, batch_size)


def _measure(
    module: Any, datamodule: Any, run_dir: Path, draw: bool = True
) -> tuple[dict[str, Any], list[Path]]:
    """FLOPs per input, expert similarity, the routing tables, test accuracy per value of
    each discrete latent and (``draw``) the routing pictures of the tested model."""
    from moe_exp.measure.capacity import at_training_capacity
    from moe_exp.measure.cost import flops_per_sample
    from moe_exp.measure.plots import run_plots, similarity_heatmap
    from moe_exp.measure.routing_table import (
        accuracy_by_value,
        routing_rows,
        write_routing_table,
    )
    from moe_exp.measure.similarity import expert_similarity, similarity_summary
    from moe_exp.training.surgery import unchanged_experts

    probe = datamodule.splits["test"].images[:PROBE_INPUTS]
    results: dict[str, Any] = dict(flops_per_sample(module.model, probe))
    results["train/acc_eval"] = eval_accuracy(
        module, datamodule.splits["train"], datamodule.eval_batch_size
    )
    test = datamodule.splits["test"]
    results.update(
        at_training_capacity(module.model, test.images, test.labels, datamodule.batch_size)
    )
    matrices = expert_similarity(module.model, probe)
    results.update(similarity_summary(matrices))
    names = {"label": datamodule.class_names, **datamodule.latent_values}
    plots_dir = run_dir / "plots"
    paths = []
    if draw:
        paths = run_plots(module, names, plots_dir)
        for i, cka in enumerate(matrices):
            tag = f"layer{i}_" if len(matrices) > 1 else ""
            paths.append(similarity_heatmap(cka, plots_dir / f"{tag}expert_similarity.png"))
    tables = {
        split: routing_rows(
            module.model,
            datamodule.splits[split],
            datamodule.eval_batch_size,
            datamodule.latent_names,
            datamodule.latent_values,
        )
        for split in ("test", "val")
        if len(datamodule.splits[split])
    }
    results["routing_tables"] = [
        str(write_routing_table(run_dir / "routing" / f"{split}.csv", rows).relative_to(run_dir))
        for split, rows in tables.items()
    ]
    if "test" in tables:
        results.update(accuracy_by_value(tables["test"], datamodule.latent_values, "test/"))
    results.update(unchanged_experts(module.model, module.old_experts))
    return results, paths


def _fit(cfg: DictConfig, trainer: Any, module: Any, datamodule: Any, ckpt: Path | None) -> None:
    """The strategy's fit, continuing from ``ckpt`` when given."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from moe_exp.training.callbacks import InterruptCheckpoint

    try:
        instantiate(cfg.strategy).fit(
            trainer, module, datamodule, ckpt_path=str(ckpt) if ckpt else None
        )
    except (SIGTERMException, KeyboardInterrupt) as err:
        savers = [c for c in trainer.callbacks if isinstance(c, InterruptCheckpoint)]
        run_dir = Path(trainer.default_root_dir)
        if not savers:  # callbacks.interrupt_checkpoint=null: nothing was saved at the signal
            name = "SIGINT" if isinstance(err, KeyboardInterrupt) else "SIGTERM"
            raise Interrupted(name, f"Interrupted by {name}; no checkpoint was saved") from err
        name = savers[0].signal_name or "SIGTERM"
        raise Interrupted(
            name,
            f"Interrupted by {name} at {savers[0].where}; checkpoint saved to "
            f"checkpoints/last.ckpt. Continue with: moe-exp resume={run_dir}",
        ) from err
    if trainer.received_sigterm and trainer.is_global_zero:
        log.warning("SIGTERM arrived as training ended; the run finishes normally")


def _train_and_test(
    cfg: DictConfig, run_dir: Path, record: RunRecord, resume: bool = False
) -> dict[str, Any]:
    import lightning as L
    import torch

    from moe_exp.app.build import build_components
    from moe_exp.app.loggers import log_to_wandb
    from moe_exp.training.callbacks import CollapseAlarm, EveryEpoch
    from moe_exp.training.checkpoints import check_fits, load_checkpoint
    from moe_exp.training.csv_logger import tag_rows

    quiet_lightning()
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule, module = build_components(cfg)
    record.update(**module.model.parameter_counts(), threads=torch.get_num_threads())

    last, checkpoint = None, None
    if resume:
        last = run_dir / "checkpoints" / "last.ckpt"
        checkpoint = load_checkpoint(last)
        check_fits(checkpoint["state_dict"], module.state_dict(), last)
        # here, not in a load hook: validate/test load the best checkpoint, whose history
        # stops at its epoch
        module.history = checkpoint.get("history", module.history)
        log.info("resuming %s from epoch %s", run_dir, checkpoint.get("epoch"))
        record.update(resumed_from_epoch=checkpoint.get("epoch"))
    trainer = make_trainer(cfg, run_dir, resume_from=checkpoint)
    del checkpoint
    trainer.callbacks.append(
        EveryEpoch(lambda trainer: record.update(epochs=trainer.current_epoch + 1))
    )
    # each metrics row says whether it is training or the final evaluation (fit, validate, test)
    tag_rows(trainer.loggers, "phase", lambda: getattr(trainer.state.fn, "value", ""))
    started = time.perf_counter()
    _fit(cfg, trainer, module, datamodule, last)
    fit_seconds = time.perf_counter() - started  # this attempt's training (and validations)
    if trainer.fast_dev_run:  # a few batches of each split: nothing to measure or claim
        trainer.test(module, datamodule=datamodule, verbose=False)
        batches = int(trainer.fast_dev_run)
        record.finish("debug", fast_dev_run=f"{batches} batch(es) of each split, no results")
        return {}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = "best" if best else None
    kw = {"datamodule": datamodule, "ckpt_path": ckpt, "verbose": False, "weights_only": True}
    val = trainer.validate(module, **kw)[0]
    test = trainer.test(module, **kw)[0]
    results: dict[str, Any] = {k: float(v) for k, v in {**val, **test}.items()}
    if not trainer.is_global_zero:
        return results  # rank 0 measures, draws and writes the record
    measured, plots = _measure(module, datamodule, run_dir, draw=cfg.get("plots", True))
    alarms = [c for c in trainer.callbacks if isinstance(c, CollapseAlarm)]
    results.update(
        measured,
        **module.last_epoch(),
        epochs=trainer.current_epoch,
        train_samples_per_s=module.train_samples_per_s,
        fit_time_s=round(fit_seconds, 3),
        collapse_events=alarms[0].events if alarms else None,
        best_checkpoint=str(Path(best).relative_to(run_dir)) if best else None,
        plots=[str(p.relative_to(run_dir)) for p in plots],
    )
    results["gap/acc_eval"] = results["train/acc_eval"] - results["val/acc"]
    record.finish("completed", **results)
    log_to_wandb(trainer.loggers, record.data, plots, datamodule.class_names, module.test_tables)
    return results
