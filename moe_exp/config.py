"""Config checks (run once, before anything heavy) and the one place that instantiates.

Types are checked against dataclass schemas through OmegaConf's own conversion; ranges and
cross-field rules are plain code, since Hydra merges skip a dataclass's ``__post_init__``.
"""

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import BooleanNode, DictConfig, FloatNode, IntegerNode, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from moe_exp.errors import ConfigError


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


def _typed(cfg: DictConfig, path: str, schema: type) -> tuple[dict[str, Any], list[str]]:
    """Convert the schema's keys under ``path`` to their declared types, noting failures."""
    node = OmegaConf.select(cfg, path) if path else cfg
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields(schema):
        key = f"{path}.{f.name}" if path else f.name
        if node is None or f.name not in node:
            problems.append(f"{key} is missing (expected {f.type.__name__})")
            continue
        raw = node[f.name]
        try:
            values[f.name] = _NODES[f.type](raw)._value()
        except OmegaConfBaseException:
            problems.append(f"{key}={raw!r} has the wrong type: expected {f.type.__name__}")
    return values, problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed."""
    problems: list[str] = []
    typed: dict[str, dict[str, Any]] = {}
    for path, schema in SCHEMAS.items():
        typed[path], found = _typed(cfg, path, schema)
        problems += found
    top, optim = typed[""], typed["optim"]

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    if "experts" in top:
        check(top["experts"] >= 1, f"experts={top['experts']} must be >= 1")
    if "k" in top:
        check(top["k"] >= 1, f"k={top['k']} must be >= 1")
        if "experts" in top and top["experts"] >= 1:
            check(top["k"] <= top["experts"], f"k={top['k']} must be <= experts={top['experts']}")
    if "threads" in top:
        check(top["threads"] >= 1, f"threads={top['threads']} must be >= 1")
    if "lr" in optim:
        check(optim["lr"] > 0, f"optim.lr={optim['lr']} must be > 0")
    if "weight_decay" in optim:
        check(
            optim["weight_decay"] >= 0, f"optim.weight_decay={optim['weight_decay']} must be >= 0"
        )
    if "scheduler" in optim:
        check(
            optim["scheduler"] in SCHEDULERS,
            f"optim.scheduler={optim['scheduler']!r} is not one of {', '.join(SCHEDULERS)}",
        )
    if "batch_size" in typed["data"]:
        bs = typed["data"]["batch_size"]
        check(bs >= 1, f"data.batch_size={bs} must be >= 1")
    if "max_epochs" in typed["trainer"]:
        me = typed["trainer"]["max_epochs"]
        check(me >= 1, f"trainer.max_epochs={me} must be >= 1")
    for name, node in (cfg.get("regularizer") or {}).items():
        weight = node.get("weight") if isinstance(node, DictConfig) else None
        check(
            isinstance(weight, (int, float)) and weight >= 0,
            f"regularizer.{name}.weight={weight!r} must be a number >= 0",
        )
    if problems:
        raise ConfigError(
            "Invalid configuration: " + "; ".join(problems) + ". Fix these overrides and run "
            "again (`moe-exp --help` lists the config groups and their options)."
        )


def build(node: Any, **kwargs: Any) -> Any:
    """Instantiate a config node (``_target_``): the project's only call to Hydra's instantiate."""
    from hydra.utils import instantiate

    if node is None:
        return None
    return instantiate(node, _convert_="all", **kwargs)
