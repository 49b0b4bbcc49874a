"""Resuming a run in its own folder: the command line that continues it, the checks that it
can continue, and the metrics rows it keeps.

``moe-exp resume=DIR`` becomes DIR's saved overrides plus ``hydra.run.dir=DIR`` before Hydra
starts (Hydra fixes the output folder before the task runs). The run then continues from
``checkpoints/last.ckpt``; Lightning's CSV logger deletes metrics.csv when it starts, so the
rows of the epochs already done are handed back to it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_exp.app.compose import override_key
from moe_exp.errors import ConfigError, MoeExpError

RESUME_KEY = "resume"
_PLAIN_PATH = re.compile(r"^[\w/.\-~:]+$")


def is_resume_override(override: str) -> bool:
    return override_key(override) == RESUME_KEY


def _quote(value: str) -> str:
    """A value Hydra's override parser reads back verbatim."""
    if _PLAIN_PATH.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """``moe-exp resume=DIR [more overrides]`` → DIR's saved overrides + the extra ones +
    ``resume=DIR hydra.run.dir=DIR``: the same config, in the same folder.

    Raises SystemExit with a one-line message when DIR is not a run folder.
    """
    found = [a for a in argv[1:] if is_resume_override(a)]
    if not found:
        return argv
    raw = found[-1].split("=", 1)[1].strip("'\"")
    if not raw or raw.lower() == "null":
        return [a for a in argv if not is_resume_override(a)]
    folder = Path(raw).expanduser().resolve()
    saved = folder / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise SystemExit(
            f"moe-exp: resume={raw}: {folder} is not a run folder (no .hydra/overrides.yaml). "
            "Give the folder of one run, e.g. outputs/runs/<date>/<time> or "
            "outputs/multiruns/<date>/<time>/<job number>."
        )
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise SystemExit("moe-exp: resume= continues one run; drop -m/--multirun.")
    summary = folder / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
        raise SystemExit(
            f"moe-exp: resume={raw}: this run completed; there is nothing to continue, and its "
            "results stay as they are. To train longer, start a new run with more "
            "trainer.max_epochs."
        )
    before = [str(o) for o in OmegaConf.load(saved) if not is_resume_override(str(o))]
    extra = [a for a in argv[1:] if not is_resume_override(a)]
    return [
        argv[0],
        *before,
        *extra,
        f"{RESUME_KEY}={_quote(str(folder))}",
        f"hydra.run.dir={_quote(str(folder))}",
    ]


# what fixes the length of the learning-rate schedule a checkpoint's scheduler state holds
# (total steps = epochs x batches per epoch)
SCHEDULE_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.limit_train_batches",
    "trainer.devices",
    "trainer.num_nodes",
    "data._target_",
    "data.n_train",
    "data.train_fraction",
    "data.val_fraction",
    "data.batch_size",
    "optim.scheduler",
)


def check_resume_folder(folder: Path, run_dir: Path, cfg: DictConfig) -> None:
    if folder.resolve() != run_dir.resolve():
        raise ConfigError(
            f"resume={folder} must run in that folder, but this run's folder is {run_dir}: "
            "start it as `moe-exp resume=<run folder>` (the CLI sets hydra.run.dir)"
        )
    if not (folder / "checkpoints" / "last.ckpt").is_file():
        raise MoeExpError(
            f"resume={folder}: there is no checkpoints/last.ckpt to continue from (the run "
            "stopped before the end of its first epoch without a SIGTERM or Ctrl+C); start it "
            "anew"
        )
    check_same_schedule(folder, run_dir / "config.yaml", cfg)


def check_same_schedule(folder: Path, saved: Path, cfg: DictConfig) -> None:
    """A resume must keep the schedule's length: the checkpoint's OneCycle/cosine state has
    the original total steps, and stepping past them fails late (after files are written)."""
    if not saved.is_file():
        return
    before = OmegaConf.load(saved)
    if {OmegaConf.select(c, "optim.scheduler") for c in (cfg, before)} == {"none"}:
        return  # a constant learning rate: no length to keep
    missing = object()
    changed = [
        f"{key}={OmegaConf.select(cfg, key)} (the run has {old})"
        for key in SCHEDULE_KEYS
        if (old := OmegaConf.select(before, key, default=missing)) is not missing
        and OmegaConf.select(cfg, key) != old
    ]
    if changed:
        raise ConfigError(
            f"resume={folder} cannot change {', '.join(changed)}: the checkpoint's "
            "learning-rate schedule spans the run's original length. Resume without it, "
            "or start a new run."
        )


def carry_csv_rows(run_dir: Path, before_epoch: int) -> list[dict[str, Any]]:
    """metrics.csv rows of the epochs a resumed run keeps (Lightning's CSV logger deletes the
    file when it starts; the rows are handed back to it)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            kept = {k: _number(v) for k, v in row.items() if v not in ("", None)}
            if "epoch" in kept and kept["epoch"] < before_epoch:
                rows.append(kept)
    return rows


def first_epoch_after(checkpoint: Mapping[str, Any]) -> int:
    """The first epoch a run resumed from ``checkpoint`` trains: the one it was stopped in,
    or the next one when the checkpoint was saved at an epoch's end (Lightning's fit-loop
    progress counts the epochs fully processed)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value
