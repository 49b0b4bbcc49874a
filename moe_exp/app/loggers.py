"""Weights & Biases through Lightning's WandbLogger, safe without a network.

W&B runs online only when online is asked for (``mode=online`` or WANDB_MODE=online) AND an
API key is configured (WANDB_API_KEY or a netrc entry); otherwise offline, so a run never
blocks at a login prompt or waits on a network. The chosen mode is logged. The run id is
kept in the run folder (``wandb_id.txt``) so a resumed run continues the same W&B run.
Metrics are charted against ``epoch`` (``define_metric``), the summary keeps the best
``val/acc`` and the final test metrics, and a finished run adds per-expert tables (load,
importance, accuracy and inputs seen, per split; the expert × class contingency) and the
routing pictures.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("moe_exp")
MODES = ("auto", "offline", "online")


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str = "auto") -> str:
    """'online' only when asked for and a key exists; 'offline' otherwise."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
    asked = mode == "online" or (mode == "auto" and os.environ.get("WANDB_MODE") == "online")
    if asked and not _api_key_configured():
        log.warning("W&B online mode was asked for but no API key is configured: logging offline")
        return "offline"
    return "online" if asked else "offline"


def _hydra_names() -> tuple[str | None, str | None]:
    """(group, name): the sweep's folder for a multirun, and the job's overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None, None
        hc = HydraConfig.get()
        name = ",".join(hc.overrides.task) or "default"
        if str(hc.mode) == "RunMode.MULTIRUN":
            return f"sweep-{Path(hc.sweep.dir).name}", name
        return "single", name
    except Exception:
        return None, None


def wandb_logger(
    save_dir: str,
    project: str = "moe-exp",
    mode: str = "auto",
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    run_config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A WandbLogger writing under ``save_dir/wandb``, offline unless online is safe;
    ``run_config`` goes into the W&B run's config (an eval's link to its trained run)."""
    from lightning.pytorch.loggers import WandbLogger

    resolved = resolve_mode(mode)
    os.environ["WANDB_MODE"] = resolved
    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = Path(save_dir) / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    hydra_group, hydra_name = _hydra_names()
    log.info("W&B logging %s (project %s, run id %s)", resolved.upper(), project, run_id)
    logger = WandbLogger(
        save_dir=save_dir,
        project=project,
        offline=resolved == "offline",
        id=run_id,
        resume="allow",
        group=group or hydra_group,
        name=name or hydra_name,
        tags=list(tags or []),
        **({"config": run_config} if run_config else {}),
        **kwargs,
    )
    run = logger.experiment
    run.define_metric("epoch")
    for charted in ("train/*", "val/*", "gap/*", "lr-*"):
        run.define_metric(charted, step_metric="epoch")
    run.define_metric("val/acc", step_metric="epoch", summary="max")
    return logger


SPLITS = ("train", "val", "test")
PER_EXPERT = ("load", "importance", "acc", "seen")


def expert_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-expert table: one row per split and expert."""
    found = (re.fullmatch(r"test/load_e(\d+)", k) for k in summary)
    experts = sorted(int(m.group(1)) for m in found if m)
    rows = [
        [split, e, *(summary.get(f"{split}/{name}_e{e}") for name in PER_EXPERT)]
        for split in SPLITS
        for e in experts
        if f"{split}/load_e{e}" in summary
    ]
    return ["split", "expert", *PER_EXPERT], rows


def log_to_wandb(
    loggers: list[Any],
    summary: dict[str, Any],
    images: list[Path],
    class_names: Sequence[str] = (),
    test_tables: Sequence[Any] = (),
) -> None:
    """Summary metrics, per-expert tables and pictures to every W&B logger of a finished run;
    ``test_tables`` are the test split's routing statistics per MoE layer, whose expert ×
    class mass becomes one table each."""
    from lightning.pytorch.loggers import WandbLogger

    layers = [t.class_mass for t in test_tables if t.class_mass.numel()]
    for lg in (lg for lg in loggers if isinstance(lg, WandbLogger)):
        # the best val/acc stays the summary's (define_metric summary="max")
        numbers = {
            k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and k != "val/acc"
        }
        lg.experiment.summary.update(numbers)
        columns, rows = expert_table(summary)
        lg.log_table("tables/experts", columns=columns, data=rows)
        for i, mass in enumerate(layers):
            tag = f"_layer{i}" if len(layers) > 1 else ""
            cells = [[e, class_names[c], float(mass[e, c])] for e in range(mass.shape[0])
                     for c in range(mass.shape[1])]  # fmt: skip
            lg.log_table(
                f"tables/expert_class{tag}", columns=["expert", "class", "mass"], data=cells
            )
        for path in images:  # one key per picture: sizes differ
            lg.log_image(f"plots/{path.stem}", images=[str(path)])


def close_wandb(failed: bool) -> None:
    """``wandb.finish()`` after every job, so a multirun's next job starts its own W&B run."""
    wandb = sys.modules.get("wandb")  # never imported unless a W&B logger was built
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
