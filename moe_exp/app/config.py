"""Config checks (run once, before anything heavy) and the one place that instantiates.

Three layers, all reported together in one :class:`~moe_exp.errors.ConfigError`:

1. Types of the keys every run reads, against dataclass schemas, through OmegaConf's own
   conversion (``experts=abc`` → "expected int").
2. Ranges by key name, wherever the key sits in the composed config (``RANGES``): a new
   expert with a ``dropout`` gets the probability rule without new code. A few keys differ by
   the object they configure (``TARGET_RANGES``: a soft tree's ``depth`` must be >= 1, an
   MLP's may be 0).
3. Cross-field rules (:func:`_cross_field_problems`): ``k <= experts``, top-1 gates, tree
   balance without trees, expert counts of ``expert=mixed``, group gating, staged strategies,
   GPUs that are not there. Hydra merges skip a dataclass's ``__post_init__``, so these are
   plain code.

Every message names the key, the bad value and what is allowed.
"""

from __future__ import annotations

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

from moe_exp.errors import (
    COUNT,
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
# (class name of the node's _target_, key) → range, where one name means different things.
TARGET_RANGES: dict[tuple[str, str], Range] = {
    ("SoftTreeExpert", "depth"): COUNT,
    ("VisionMoE", "depth"): COUNT,
    ("ResNetExpert", "blocks"): COUNT,  # each entry of the list
}

# Gates that send every input to exactly one expert: they have no k.
TOP1_GATES = {"SwitchGate": "switch", "BASEGate": "base"}
STAGED_STRATEGIES = {"HierarchicalStrategy": "hierarchical", "EMStrategy": "em"}
EM_SCHEDULES = ("batch", "epoch")
GPU_ACCELERATORS = ("gpu", "cuda")
OBJECTIVE_SPLITS = ("val/", "test/")


def _class(node: Any) -> str:
    """The class (or function) name a config node instantiates, '' if none."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if isinstance(target, str):
            return target.rsplit(".", 1)[-1]
    return ""


def _leaves(node: Any, path: str = "", owner: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted path, key name, resolved value, owner class) for every leaf under ``node``."""
    if isinstance(node, DictConfig):
        owner = _class(node) or owner
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
            elif name == "blocks":
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


def _range_problems(cfg: DictConfig, typed: dict[str, dict[str, Any]], skip: set[str]) -> list:
    problems = []
    for path, name, value, owner in _leaves(cfg):
        if path in skip:
            continue
        rule = TARGET_RANGES.get((owner, name)) or REQUIRED.get(path) or RANGES.get(name)
        if rule is None:
            continue
        section, _, key = path.rpartition(".")
        if key in typed.get(section, {}):
            value = typed[section][key]  # schema keys: checked as their declared type
        if not rule.allows(value):
            problems.append(f"{path}={rule.show(value)} must be {must_be(rule, value)}")
    return problems


def _targets(node: Any) -> set[str]:
    """Class names of every ``_target_`` under ``node``."""
    found: set[str] = set()
    if isinstance(node, DictConfig):
        if _class(node):
            found.add(_class(node))
        for key in node:
            try:
                found |= _targets(node[key])
            except OmegaConfBaseException:
                continue
    elif isinstance(node, ListConfig):
        for value in node:
            found |= _targets(value)
    return found


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b=1`` → ``a.b``, ``~x`` → ``x``."""
    return override.lstrip("+~").split("=", 1)[0]


def _explicit(overrides: Sequence[str], key: str) -> bool:
    """Whether the command line (or the sweep) set ``key`` itself."""
    return any(override_key(o) == key for o in overrides)


def _cross_field_problems(cfg: DictConfig, top: dict[str, Any], overrides: Sequence[str]) -> list:
    problems: list[str] = []
    experts, k = top.get("experts"), top.get("k")
    valid_counts = isinstance(experts, int) and experts >= 1 and isinstance(k, int) and k >= 1
    if valid_counts and k > experts:
        problems.append(f"k={k} must be <= experts={experts}")

    gate = cfg.get("gate")
    gate_class = _class(gate)
    if gate_class in TOP1_GATES and isinstance(k, int) and k > 1 and _explicit(overrides, "k"):
        k_gates = "topk, noisy_topk, hash, cosine, bias_balanced, hierarchical"
        problems.append(
            f"k={k} asks for top-{k} routing, but gate={TOP1_GATES[gate_class]} is top-1 only "
            f"(every input goes to exactly one expert); use k=1, or a top-k gate: {k_gates}"
        )
    if gate_class == "HierarchicalGate" and valid_counts and isinstance(gate, DictConfig):
        groups, k_group = gate.get("num_groups"), gate.get("k_group")
        if isinstance(groups, int) and groups >= 1:
            if experts % groups:
                divisors = [d for d in range(1, experts + 1) if experts % d == 0]
                problems.append(
                    f"gate.num_groups={groups} must divide experts={experts} "
                    f"(allowed: {', '.join(map(str, divisors))})"
                )
            elif k > experts // groups:
                problems.append(
                    f"k={k} must be <= experts per group={experts // groups} for "
                    f"gate=hierarchical (experts={experts}, gate.num_groups={groups})"
                )
            if isinstance(k_group, int) and k_group > groups:
                problems.append(f"gate.k_group={k_group} must be <= gate.num_groups={groups}")

    model_class = _class(cfg.get("model"))
    uses_expert_group = model_class != "VisionMoE"
    expert = cfg.get("expert")
    regularizers = cfg.get("regularizer") or {}
    tree_keys = [n for n, node in regularizers.items() if _class(node) == "TreeBalanceLoss"]
    has_trees = uses_expert_group and "SoftTreeExpert" in _targets(expert)
    if tree_keys and not has_trees:
        why = (
            f"model={model_class} ignores the expert group"
            if not uses_expert_group
            else f"the experts are {_class(expert) or 'not trees'}"
        )
        problems.append(
            f"regularizer.{tree_keys[0]} (tree balance) needs soft-tree experts, but {why}; "
            "use expert=tree (or a mixed group with tree experts), or drop tree_balance"
        )

    if _class(expert) == "mixed" and isinstance(experts, int) and isinstance(expert, DictConfig):
        counts = [g.get("count") for g in expert.get("groups") or []]
        if all(isinstance(c, int) for c in counts) and sum(counts) != experts:
            problems.append(
                f"expert.groups counts {counts} sum to {sum(counts)} but experts={experts}: "
                "make the counts sum to experts"
            )

    strategy_class = _class(cfg.get("strategy"))
    if strategy_class in STAGED_STRATEGIES:
        name = STAGED_STRATEGIES[strategy_class]
        if model_class != "MixtureClassifier":
            problems.append(
                f"strategy={name} needs model=mixture (a separate gate and whole-classifier "
                f"experts), not {model_class or 'this model'}; or use strategy=joint"
            )
        elif (cfg.model.get("shared_experts") or 0) > 0:
            problems.append(
                f"model.shared_experts={cfg.model.shared_experts} is not supported by "
                f"strategy={name} (always-on experts are outside the gate); set it to 0"
            )

    schedule = cfg.strategy.get("schedule") if strategy_class == "EMStrategy" else None
    if schedule is not None and schedule not in EM_SCHEDULES:
        problems.append(
            f"strategy.schedule={schedule!r} is not one of {', '.join(EM_SCHEDULES)} "
            "(batch: E-step and M-step every batch; epoch: experts and gate epochs alternate)"
        )

    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "")).lower()
    if accelerator in GPU_ACCELERATORS:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this "
                "machine; use trainer=default (CPU) or run where a GPU is"
            )

    objective = cfg.get("objective")
    names = [objective] if isinstance(objective, str) else list(objective or [])
    for name in names:
        if not (isinstance(name, str) and name.startswith(OBJECTIVE_SPLITS)):
            problems.append(
                f"objective={name!r} must name a val/ or test/ metric (e.g. val/acc, "
                "val/cv_load), or a list of them for a multi-objective search"
            )
    return problems


def validate(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Raise ConfigError naming every bad key, its value and what is allowed.

    ``overrides`` are the run's command-line (or sweep) overrides: a few rules apply only
    to what was asked for explicitly (``k=2`` with a top-1 gate; the default k belongs to
    the top-k gates).
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
    problems += _cross_field_problems(cfg, typed[""], overrides)
    if problems:
        raise ConfigError(
            "Invalid configuration: " + "; ".join(problems) + ". Fix these overrides and run "
            "again (`moe-exp --help` lists the config groups and their options)."
        )


def strategy_launches_scripts(trainer: Any) -> bool:
    """Whether the trainer's strategy is DDP that starts its other processes by re-running
    the command line (Lightning's default ``ddp``: the subprocess-script launcher), with more
    than one process. ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` start them in-process."""
    if not isinstance(trainer, DictConfig):
        return False
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        method = strategy.get("start_method", "popen")
        scripted = _class(strategy) == "DDPStrategy" and method in (None, "popen")
    else:
        name = str(strategy or "auto")
        # "auto" picks ddp (the script launcher) for several devices
        scripted = (name == "auto" or name.startswith("ddp")) and not any(
            m in name for m in ("spawn", "fork", "notebook")
        )
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    on_cpu = str(trainer.get("accelerator", "auto")) == "cpu"
    single = (devices == 1 or (devices == "auto" and on_cpu)) and nodes == 1
    return scripted and not single


def check_launch(cfg: DictConfig, multirun: bool, launcher_target: str) -> None:
    """Fail before anything heavy when a multirun job would re-launch the sweep: Lightning's
    script-launching DDP re-runs ``sys.argv`` in each child, which under ``-m`` starts the
    whole sweep again (lightning-hydra-template #393, Lightning #11300). SLURM (submitit)
    starts one task per device itself, so DDP there creates no processes."""
    if not (multirun and strategy_launches_scripts(cfg.get("trainer"))):
        return
    if launcher_target.endswith("SlurmLauncher"):
        return
    devices = cfg.trainer.get("devices")
    raise ConfigError(
        f"trainer.strategy={_strategy_name(cfg.trainer)} with trainer.devices={devices} cannot "
        "run inside a -m sweep on this launcher: Lightning's ddp re-runs the command line in "
        "each new process, which starts the whole sweep again. Use hydra/launcher=slurm (or "
        "submitit_slurm with hydra.launcher.tasks_per_node = trainer.devices, so SLURM starts "
        "the processes), or trainer.strategy=ddp_spawn for a local sweep, or drop -m."
    )


def _strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy")
    return _class(strategy) if isinstance(strategy, DictConfig) else str(strategy)


def build(node: Any, **kwargs: Any) -> Any:
    """Instantiate a config node (``_target_``): the project's only call to Hydra's instantiate."""
    from hydra.utils import instantiate

    if node is None:
        return None
    return instantiate(node, _convert_="all", **kwargs)
