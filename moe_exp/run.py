"""One run: validate → build data, model and trainer → train with the strategy → test →
measure (cost, expert similarity, pictures) → write the run record. Heavy imports live
here, off the path of ``--help``."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_exp.build import build_components
from moe_exp.config import build, validate
from moe_exp.errors import DivergedError
from moe_exp.loggers import close_wandb
from moe_exp.record import RunRecord

log = logging.getLogger("moe_exp")
PROBE_INPUTS = 256  # test inputs used for FLOP counting and expert similarity


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> float:
    """Train and evaluate one configuration in ``run_dir``; returns the validation accuracy."""
    run_dir = Path(run_dir)
    record = RunRecord(run_dir, overrides)
    try:
        validate(cfg)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        results = _train_and_test(cfg, run_dir, record)
    except DivergedError as err:
        record.finish("diverged", error=str(err))
        raise
    except BaseException as err:
        record.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        close_wandb(failed=record.data["status"] != "completed")
    cv_load = [v for k, v in results.items() if k.startswith("test/") and k.endswith("cv_load")]
    log.info(
        "done in %.1f s: test/acc=%.4f val/acc=%.4f test/cv_load=%s → %s",
        record.data["wall_time_s"],
        results.get("test/acc", float("nan")),
        results.get("val/acc", float("nan")),
        ", ".join(f"{v:.3f}" for v in cv_load),
        run_dir,
    )
    return float(results["val/acc"])


def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def make_trainer(cfg: DictConfig, run_dir: Path) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moe_exp.callbacks import CollapseAlarm, progress_bar

    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    loggers = [build(node, save_dir=str(run_dir)) for node in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    extra = [build(node) for node in (cfg.get("callbacks") or {}).values()]
    return build(
        cfg.trainer,
        callbacks=[checkpoint, progress_bar(), CollapseAlarm(run_dir), *extra],
        logger=loggers or False,
        default_root_dir=str(run_dir),
    )


def _measure(module: Any, datamodule: Any, run_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """FLOPs per input, expert similarity and the routing pictures of the tested model."""
    from moe_exp.cost import flops_per_sample
    from moe_exp.plots import run_plots, similarity_heatmap
    from moe_exp.similarity import expert_similarity, similarity_summary

    probe = datamodule.splits["test"].images[:PROBE_INPUTS]
    results: dict[str, Any] = dict(flops_per_sample(module.model, probe))
    matrices = expert_similarity(module.model, probe)
    results.update(similarity_summary(matrices))
    names = {"label": datamodule.class_names, **datamodule.latent_values}
    plots_dir = run_dir / "plots"
    paths = run_plots(module, names, plots_dir)
    for i, cka in enumerate(matrices):
        tag = f"layer{i}_" if len(matrices) > 1 else ""
        paths.append(similarity_heatmap(cka, plots_dir / f"{tag}expert_similarity.png"))
    return results, paths


def _train_and_test(cfg: DictConfig, run_dir: Path, record: RunRecord) -> dict[str, Any]:
    import lightning as L

    from moe_exp.callbacks import CollapseAlarm
    from moe_exp.loggers import log_to_wandb

    _quiet_lightning()
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule, module = build_components(cfg)
    record.update(**module.model.parameter_counts())

    trainer = make_trainer(cfg, run_dir)
    build(cfg.strategy).fit(trainer, module, datamodule)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = "best" if best else None
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
    results: dict[str, Any] = {k: float(v) for k, v in {**val, **test}.items()}
    measured, plots = _measure(module, datamodule, run_dir)
    (alarm,) = [c for c in trainer.callbacks if isinstance(c, CollapseAlarm)]
    results.update(
        measured,
        epochs=trainer.current_epoch,
        train_samples_per_s=module.train_samples_per_s,
        collapse_events=alarm.events,
        best_checkpoint=str(Path(best).relative_to(run_dir)) if best else None,
        plots=[str(p.relative_to(run_dir)) for p in plots],
    )
    record.finish("completed", **results)
    log_to_wandb(trainer.loggers, record.data, plots)
    return results
