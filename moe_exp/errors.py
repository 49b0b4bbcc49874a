"""User-facing errors, and the value ranges whose breach raises them.

Hydra prints a CompactHydraException's message without a traceback (the full trace stays
available with HYDRA_FULL_ERROR=1). ``RANGES`` maps a key name to its allowed interval
wherever the key sits: the app's config checks and the components' own constructors read
the same table, so a value is refused in the same words by the runner and by the library.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from hydra.errors import CompactHydraException


class MoeExpError(CompactHydraException):
    """A run could not proceed for a reason the user should read, not a bug."""


class ConfigError(MoeExpError):
    """The composed config breaks a rule; raised before anything heavy runs."""


class DivergedError(MoeExpError):
    """The training loss became NaN or infinite."""


class DataNotFoundError(MoeExpError):
    """A dataset's files are missing (or fail their checksum) under ``data.root``."""


class WriteError(MoeExpError):
    """A file of the run could not be written: a full disk, a read-only or missing folder."""

    ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

    @classmethod
    def of(cls, err: OSError, what: str = "a file of the run", verb: str = "write") -> WriteError:
        where = f" ({err.filename})" if err.filename else ""
        return cls(
            f"Could not {verb} {what}{where}: {err.strerror or err} (errno {err.errno}). Free "
            "space or fix the folder's permissions, or write elsewhere: "
            "paths.output_dir=<folder> (or hydra.run.dir=<folder>)."
        )


@dataclass(frozen=True)
class Range:
    """An allowed interval for a number; ``integer`` demands an int, ``nullable`` allows null."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if value != value:  # NaN
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (
            self.high is not None and (value >= self.high if self.high_open else value > self.high)
        )

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                f"{_num(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        kind = "an integer" if self.integer else "a number"
        return f"{kind} {text}" + (" or null" if self.nullable else "")

    def show(self, value: Any) -> str:
        """The value as the message prints it (ints given to float keys print as floats)."""
        if isinstance(value, int) and not isinstance(value, bool) and not self.integer:
            return repr(float(value))
        return repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


COUNT = Range(1, integer=True)
COUNT_OR_NULL = Range(1, integer=True, nullable=True)
COUNT0 = Range(0, integer=True)
POSITIVE = Range(0, low_open=True)
POSITIVE_OR_NULL = Range(0, low_open=True, nullable=True)
NONNEGATIVE = Range(0)
NONNEGATIVE_OR_NULL = Range(0, nullable=True)
DROPOUT = Range(0, 1, high_open=True)

# Key name → allowed range, applied to every key of that name in the composed config.
RANGES: dict[str, Range] = {
    # probabilities and fractions
    "dropout": DROPOUT,
    "expert_dropout": DROPOUT,
    "jitter": DROPOUT,
    "label_noise": DROPOUT,
    "val_fraction": Range(0, 1, low_open=True, high_open=True),
    "train_fraction": Range(0, 1, low_open=True),
    "cluster_fraction": Range(0, 1),
    "test_fraction": Range(0, 1, low_open=True, high_open=True),
    # counts and sizes
    "experts": COUNT,
    "k": COUNT,
    "threads": COUNT,
    "batch_size": COUNT,
    "eval_batch_size": COUNT,
    "n_train": COUNT_OR_NULL,
    "n_val": COUNT_OR_NULL,
    "n_test": COUNT_OR_NULL,
    "max_epochs": COUNT,
    "epochs": COUNT_OR_NULL,
    "em_steps": COUNT,
    "kmeans_iters": COUNT,
    "log_every_n_steps": COUNT,
    "image_size": COUNT,
    "width": COUNT,
    "hidden": COUNT,
    "gate_width": COUNT,
    "expert_hidden": COUNT_OR_NULL,
    "dim": COUNT,
    "heads": COUNT,
    "patch": COUNT,
    "moe_every": COUNT,
    "num_groups": COUNT,
    "k_group": COUNT,
    "slots_per_expert": COUNT,
    "group_size": COUNT_OR_NULL,
    "depth": COUNT0,
    "count": COUNT0,
    "shared_experts": COUNT0,
    "clutter": COUNT0,
    "projection": COUNT0,
    "crop_padding": Range(0, integer=True, nullable=True),
    "num_nodes": COUNT,
    "patience": COUNT0,
    "add": COUNT0,  # surgery.add: experts appended
    # rates, weights, temperatures
    "lr": POSITIVE_OR_NULL,
    "router_lr": POSITIVE_OR_NULL,
    "weight_decay": NONNEGATIVE_OR_NULL,
    "router_weight_decay": NONNEGATIVE_OR_NULL,
    "weight": NONNEGATIVE,
    "capacity_factor": POSITIVE_OR_NULL,
    "eval_capacity_factor": POSITIVE_OR_NULL,
    "temperature": POSITIVE,
    "gate_temperature": POSITIVE,
    "beta": POSITIVE,
    "mlp_ratio": POSITIVE,
    "bias_update_rate": NONNEGATIVE,
    "noise": NONNEGATIVE,
    "colour_jitter": NONNEGATIVE,
    "min_delta": NONNEGATIVE,
}


def check_ranges(section: str, values: dict[str, Any]) -> None:
    """Raise one ConfigError naming every value outside its ``RANGES`` rule, in the runner's
    words: for objects built straight from the library, where :func:`validate` never ran."""
    problems = [
        f"{section}.{key}={rule.show(value)} must be {must_be(rule, value)}"
        for key, value in values.items()
        if not (rule := RANGES[key]).allows(value)
    ]
    if problems:
        raise ConfigError(f"Invalid {section} options: " + "; ".join(problems) + ".")


def must_be(rule: Range, value: Any) -> str:
    """What ``value`` must be, in the words users know: '>= 1' below a plain count, '> 0'
    for plain rates, else the full description."""
    if rule == COUNT and isinstance(value, int) and not isinstance(value, bool):
        return ">= 1"
    if rule == POSITIVE:
        return "> 0"
    if rule == NONNEGATIVE:
        return "a number >= 0"
    return rule.describe()
