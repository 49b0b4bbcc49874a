"""The ``moe-exp-eval`` console script: evaluate a trained run again, without training.

``moe-exp-eval run=DIR [ckpt=best|last|PATH] [split=test|val|train] [overrides]`` rebuilds
DIR's model from its own overrides plus the new ones (which change what is evaluated:
another dataset or split size, another capacity), loads the checkpoint (``weights_only``,
shape-checked) and tests it. The result is an eval folder inside the run,
``DIR/evals/<time>/``, with ``summary.json`` (the training run's test metric names, and what
was evaluated from which checkpoint), the routing pictures and ``routing/<split>.csv``; the
run's own record is never touched. ``-m run=A,B`` evaluates several runs.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from moe_exp.app.compose import config_dir, override_key
from moe_exp.app.resume import is_resume_override
from moe_exp.errors import ConfigError, MoeExpError

EVAL_KEYS = ("run", "ckpt", "split")
SPLITS = ("test", "val", "train")


def _checkpoint(run_dir: Path, ckpt: str) -> Path:
    path = run_dir / "checkpoints" / f"{ckpt}.ckpt" if ckpt in ("best", "last") else Path(ckpt)
    if not path.expanduser().is_file():
        raise MoeExpError(f"ckpt={ckpt}: {path} does not exist (best, last or a .ckpt path)")
    return path.expanduser()


def _evaluated_config(run_dir: Path, extra: list[str]) -> DictConfig:
    """The run's config with the new overrides on top, composed as a run would be."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise MoeExpError(
            f"run={run_dir}: not a run folder (no .hydra/overrides.yaml): give the folder of "
            "one run, e.g. outputs/runs/<date>/<time> or outputs/multiruns/<date>/<time>/<job>"
        )
    before = [str(o) for o in OmegaConf.load(saved) if not is_resume_override(str(o))]
    return hydra.compose("config", overrides=[*before, *extra])


def evaluate(run_dir: Path, ckpt: str, split: str, extra: list[str], out: Path) -> dict:
    """Evaluate ``run_dir``'s checkpoint on ``split``; write the eval folder ``out``."""
    import lightning as L
    import torch

    from moe_exp.app.build import build_components
    from moe_exp.app.config import validate
    from moe_exp.app.loggers import close_wandb, log_to_wandb
    from moe_exp.app.record import RunRecord
    from moe_exp.app.run import quiet_lightning
    from moe_exp.measure.plots import run_plots
    from moe_exp.measure.routing_table import routing_rows, write_routing_table
    from moe_exp.training.checkpoints import check_fits, load_checkpoint

    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    cfg = _evaluated_config(run_dir, extra)
    validate(cfg, extra)
    path = _checkpoint(run_dir, ckpt)
    record = RunRecord(out, extra)
    record.update(evaluated={"run": str(run_dir), "checkpoint": str(path), "split": split})
    try:
        quiet_lightning()
        torch.set_num_threads(cfg.threads)
        L.seed_everything(cfg.seed, verbose=False)
        datamodule, module = build_components(cfg)
        checkpoint = load_checkpoint(path)
        check_fits(checkpoint["state_dict"], module.state_dict(), path)
        module.load_state_dict(checkpoint["state_dict"])
        datamodule.splits["test"] = datamodule.splits[split]  # evaluated as the test split
        loggers = _wandb_loggers(cfg, run_dir, out)
        trainer = L.Trainer(
            accelerator=cfg.trainer.get("accelerator", "auto"),
            devices=1,
            logger=loggers or False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(out),
        )
        results: dict[str, Any] = dict(
            trainer.test(module, datamodule=datamodule, verbose=False)[0]
        )
        names = {"label": datamodule.class_names, **datamodule.latent_values}
        plots = run_plots(module, names, out / "plots") if cfg.get("plots", True) else []
        rows = routing_rows(
            module.model,
            datamodule.splits[split],
            datamodule.eval_batch_size,
            datamodule.latent_names,
            datamodule.latent_values,
        )
        table = write_routing_table(out / "routing" / f"{split}.csv", rows)
        results = {k: float(v) for k, v in results.items()}
        record.finish(
            "completed",
            **results,
            plots=[str(p.relative_to(out)) for p in plots],
            routing_tables=[str(table.relative_to(out))],
        )
        log_to_wandb(loggers, record.data, plots, names["label"], module.test_tables)
    except BaseException as err:
        record.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        close_wandb(failed=record.data["status"] != "completed")
    return results


def _wandb_loggers(cfg: DictConfig, run_dir: Path, out: Path) -> list[Any]:
    """A W&B run for the eval when the evaluated config logs to W&B (the run's own logger, or
    ``logger=wandb`` given to the eval): ``job_type=eval``, in the trained run's group, with
    the trained run's W&B id in its config, so the two are linked."""
    from moe_exp.app.config import instantiate

    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return []
    id_file = run_dir / "wandb_id.txt"
    trained = id_file.read_text().strip() if id_file.is_file() else None
    link = {"evaluated_run": str(run_dir), "evaluated_wandb_id": trained}
    group = f"run-{trained}" if trained else None
    return [instantiate(node, save_dir=str(out), job_type="eval", group=group, run_config=link)]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _app(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(str(cfg.run)).expanduser().resolve()
    extra = [o for o in hc.overrides.task if override_key(o) not in EVAL_KEYS]
    out = Path(hc.runtime.output_dir)
    if run_dir not in out.resolve().parents:  # a sweep job: its eval folder goes in its run
        out = run_dir / "evals" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    results = evaluate(run_dir, str(cfg.ckpt), str(cfg.split), extra, out)
    print(
        f"evaluated {run_dir} ({cfg.ckpt}, {cfg.split}): test/acc={results['test/acc']:.4f} → {out}"
    )
    return results["test/acc"]


def main() -> None:
    _app()


if __name__ == "__main__":
    sys.exit(main())
