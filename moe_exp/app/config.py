"""Config checks (run once, before anything heavy) and the one place that instantiates.

All problems are reported together in one :class:`~moe_exp.errors.ConfigError`: types of the
keys every run reads (dataclass schemas, through OmegaConf's conversion); ranges by key name
wherever the key sits (``moe_exp.errors.RANGES``, or the owner class's ``min_values``); each
component's own rules, asked of its class (:mod:`moe_exp.app.components`); and the run's own
(a GPU that is there, an objective that names a metric). Every message names the key, the
bad value and what is allowed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import (
    BooleanNode,
    DictConfig,
    FloatNode,
    IntegerNode,
    ListConfig,
    OmegaConf,
    StringNode,
)
from omegaconf.errors import OmegaConfBaseException

from moe_exp.app.components import AXES, Unimportable, component_problems, locate, min_value
from moe_exp.errors import (
    NONNEGATIVE,
    POSITIVE,
    RANGES,
    ConfigError,
    Range,
    must_be,
)


@dataclass
class TopLevelSchema:
    experts: int
    k: int
    seed: int
    threads: int


@dataclass
class OptimSchema:
    lr: float
    weight_decay: float
    scheduler: str


@dataclass
class DataSchema:
    batch_size: int


@dataclass
class TrainerSchema:
    max_epochs: int


SCHEDULERS = ("onecycle", "cosine", "none")
SCHEMAS = {"": TopLevelSchema, "optim": OptimSchema, "data": DataSchema, "trainer": TrainerSchema}
_NODES = {int: IntegerNode, float: FloatNode, str: StringNode, bool: BooleanNode}


# The top level's own optim.lr is required (no null); the same for the other schema keys.
REQUIRED = {"optim.lr": POSITIVE, "optim.weight_decay": NONNEGATIVE}
GPU_ACCELERATORS = ("gpu", "cuda")
OBJECTIVE_SPLITS = ("val/", "test/")
MONITORED_SPLITS = ("val/", "train/")


def _leaves(node: Any, path: str = "", owner: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted path, key name, resolved value, owner) for every leaf under ``node``; the
    owner is the ``_target_`` of the nearest node that has one."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        owner = target if isinstance(target, str) else owner
        for key in node:
            if str(key).startswith("_"):
                continue
            name = str(key)
            sub = f"{path}.{name}" if path else name
            if OmegaConf.is_interpolation(node, key):
                continue  # checked where its source is defined (gate.k: ${k} → k)
            try:
                value = node[key]
            except OmegaConfBaseException:
                continue
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _leaves(value, sub, owner)
            else:
                yield sub, name, value, owner
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            sub = f"{path}[{i}]"
            name = path.rsplit(".", 1)[-1]
            if isinstance(value, (DictConfig, ListConfig)):
                yield from _leaves(value, sub, owner)
            else:  # each entry of a list of numbers is checked by the list's key
                yield sub, name, value, owner


def _typed(cfg: DictConfig, path: str, schema: type) -> tuple[dict[str, Any], list[str]]:
    """Convert the schema's keys under ``path`` to their declared types, noting failures."""
    node = OmegaConf.select(cfg, path) if path else cfg
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields(schema):
        key = f"{path}.{f.name}" if path else f.name
        if node is None or f.name not in node:
            problems.append(f"{key} is missing (expected {f.type})")
            continue
        raw = node[f.name]
        try:
            values[f.name] = _NODES[_TYPES[f.type]](raw)._value()
        except OmegaConfBaseException:
            problems.append(f"{key}={raw!r} has the wrong type: expected {f.type}")
    return values, problems


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _owner_rule(owner: str, name: str, located: dict[str, Any]) -> Range | None:
    """The owner class's own minimum for ``name`` (``min_values``), where it declares one."""
    if not owner:
        return None
    if owner not in located:
        try:
            located[owner] = locate(owner)
        except Unimportable:
            located[owner] = None  # reported by the component checks
    low = min_value(located[owner], name)
    return None if low is None else Range(low, integer=True)


def _range_problems(cfg: DictConfig, typed: dict[str, dict[str, Any]], skip: set[str]) -> list:
    problems = []
    located: dict[str, Any] = {}
    for path, name, value, owner in _leaves(cfg):
        if path in skip:
            continue
        # only the component axes' classes declare ``min_values``; the trainer's and the
        # loggers' classes are Lightning's, not imported to be checked
        owned = owner if path.split(".", 1)[0] in AXES else ""
        rule = _owner_rule(owned, name, located) or REQUIRED.get(path) or RANGES.get(name)
        if rule is None:
            continue
        section, _, key = path.rpartition(".")
        if key in typed.get(section, {}):
            value = typed[section][key]  # schema keys: checked as their declared type
        if not rule.allows(value):
            problems.append(f"{path}={rule.show(value)} must be {must_be(rule, value)}")
    return problems


def _has_problem(path: str, problems: Sequence[str]) -> bool:
    """Whether a message names ``path`` or a key under it."""
    return any(m.startswith((f"{path}=", f"{path}.", f"{path}[", f"{path} ")) for m in problems)


def _run_problems(cfg: DictConfig) -> list[str]:
    """Rules of the run itself, not of a component: a GPU that is there, callbacks and an
    objective that name a metric."""
    problems: list[str] = []
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "")).lower()
    if accelerator in GPU_ACCELERATORS:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this "
                "machine; use trainer=default (CPU) or run where a GPU is"
            )
    for name, node in (cfg.get("callbacks") or {}).items():
        monitor = node.get("monitor") if isinstance(node, DictConfig) else None
        if monitor is not None and not str(monitor).startswith(MONITORED_SPLITS):
            problems.append(
                f"callbacks.{name}.monitor={monitor!r} must name a metric logged while training:"
                " val/... or train/... (e.g. val/acc, val/loss, val/cv_load)"
            )
    objective = cfg.get("objective")
    names = list(objective) if isinstance(objective, ListConfig) else [objective]
    names = [n for n in names if n is not None]  # null: the default, val/acc
    for name in names:
        if not (isinstance(name, str) and name.startswith(OBJECTIVE_SPLITS)):
            problems.append(
                f"objective={name!r} must name a val/ or test/ metric (e.g. val/acc, "
                "val/cv_load), or a list of them for a multi-objective search"
            )
        elif not is_run_metric(name):
            problems.append(
                f"objective={name!r} is not a metric a run reports: val/ or test/, then "
                f"(layer<i>/ for token routing) one of {', '.join(run_metric_names())}, or a "
                "per-expert or per-attribute one (load_e0, importance_e0, acc_e0, nmi_colour,"
                " aux_<loss>)"
            )
    return problems


@functools.cache
def run_metric_names() -> tuple[str, ...]:
    """The metric names every MoE run reports per split (the module's and the routing
    statistics'), read off the statistics themselves so the list cannot drift."""
    import torch

    from moe_exp.measure.capacity import NAMES as CAPACITY_NAMES
    from moe_exp.moe.routing import Routing
    from moe_exp.moe.stats import RoutingStats

    stats = RoutingStats(2, num_classes=2)
    two = torch.tensor([[0], [1]])
    stats.update(
        Routing(torch.zeros(2, 2), torch.full((2, 2), 0.5), torch.ones(2, 1), two), two[:, 0]
    )
    computed = stats.compute()
    fixed = [k for k in computed if not re.search(r"_e\d+$", k)]
    return tuple(sorted({"acc", "loss", "ce", *CAPACITY_NAMES, *fixed}))


def is_run_metric(name: str) -> bool:
    """Whether ``name`` (val/... or test/...) is a metric a run's summary can hold."""
    match = re.fullmatch(r"(?:val|test)/(?:layer\d+/)?(.+)", name)
    if match is None:
        return False
    metric = match.group(1)
    dynamic = r"(load|importance|acc|seen)_e\d+|nmi_\w+|aux_\w+"
    return metric in run_metric_names() or re.fullmatch(dynamic, metric) is not None


def validate(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed.

    Types, then ranges, then every component's own rules (found from the ``_target_``s),
    then the run's. ``overrides`` are the run's command-line (or sweep) overrides: a few
    rules apply only to what was asked for explicitly (``k=2`` with a top-1 gate; the
    default k belongs to the top-k gates).
    """
    problems: list[str] = []
    typed: dict[str, dict[str, Any]] = {}
    wrong_type: set[str] = set()
    for path, schema in SCHEMAS.items():
        typed[path], found = _typed(cfg, path, schema)
        problems += found
        bad = [f.name for f in fields(schema) if f.name not in typed[path]]
        wrong_type |= {f"{path}.{name}" if path else name for name in bad}
    problems += _range_problems(cfg, typed, wrong_type)
    optim = typed["optim"]
    if "scheduler" in optim and optim["scheduler"] not in SCHEDULERS:
        problems.append(
            f"optim.scheduler={optim['scheduler']!r} is not one of {', '.join(SCHEDULERS)}"
        )
    found = list(problems)  # the rules below read only values that passed these checks
    experts, k = (
        None if _has_problem(key, found) else typed[""].get(key) for key in ("experts", "k")
    )
    problems += component_problems(cfg, experts, k, overrides, lambda p: _has_problem(p, found))
    problems += _run_problems(cfg)
    if problems:
        raise ConfigError(
            "Invalid configuration: " + "; ".join(problems) + ". Fix these overrides and run "
            "again (`moe-exp --help` lists the config groups and their options)."
        )


def instantiate(node: Any, **kwargs: Any) -> Any:
    """Instantiate a config node (``_target_``): the project's only call to Hydra's instantiate.

    A constructor that refuses a value (``ValueError``, ``TypeError``, ``ConfigError``) is a
    bad configuration the checks could not see: it becomes a ConfigError naming the node, so
    the user reads one message, not Hydra's wrapped traceback.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    if node is None:
        return None
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, (ValueError, TypeError, ConfigError)):
            raise
        where = re.search(r"full_key: (\S+)", str(err))
        key = where.group(1) if where else str(node.get("_target_", "a component"))
        message = str(cause).removeprefix("Invalid configuration: ")
        raise ConfigError(
            f"Invalid configuration: {key} could not be built: {message}. Fix these overrides "
            "and run again."
        ) from err
