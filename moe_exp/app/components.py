"""The components a config builds, found from their ``_target_``, and their own rules.

Each node with a ``_target_`` under the component axes is imported (the class, or the
function Hydra would call) and asked for its ``config_problems(args, run)`` (see
:mod:`moe_exp.moe.rules`). Nothing here knows a component by name: a user's own subclass
inherits its parent's rules, and a class of their own brings its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_exp.app.compose import config_dir, override_key
from moe_exp.moe.rules import Composition

AXES = ("data", "expert", "gate", "regularizer", "model", "strategy")


class Unimportable(Exception):
    """A ``_target_`` that cannot be imported."""


def locate(target: str) -> Any:
    """The object a ``_target_`` names, or Unimportable with Hydra's reason."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as err:  # Hydra wraps import and attribute errors alike
        raise Unimportable(str(err).splitlines()[0]) from err


def target_nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) for every node with a ``_target_`` under ``node``, outer first."""
    if isinstance(node, DictConfig):
        if isinstance(node.get("_target_"), str):
            yield path, node
        for key in node:
            try:
                child = node[key]
            except OmegaConfBaseException:
                continue
            yield from target_nodes(child, f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from target_nodes(child, f"{path}[{i}]")


def own_args(node: DictConfig) -> dict[str, Any] | None:
    """The node's values, resolved, without Hydra's keys (None if they do not resolve)."""
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return None
    return {k: v for k, v in values.items() if not str(k).startswith("_")}


def choices_from(overrides: Sequence[str]) -> dict[str, str]:
    """The group options a run chose: Hydra's record when it runs the app, else the
    ``group=option`` overrides (compose API, tests)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v}
    picked = {override_key(o): o.partition("=")[2] for o in overrides}
    return {key: value for key, value in picked.items() if key in AXES and value}


def group_options(group: str, accepts: Callable[[Any], bool]) -> list[str]:
    """The options of a config group (in the packaged tree) whose target passes ``accepts``."""
    found = []
    for path in sorted(Path(config_dir(), group).glob("*.yaml")):
        target = (OmegaConf.load(path) or {}).get("_target_")
        try:
            if isinstance(target, str) and accepts(locate(target)):
                found.append(path.stem)
        except Unimportable:
            continue
    return found


def component_problems(
    cfg: DictConfig,
    experts: int | None,
    k: int | None,
    overrides: Sequence[str],
    skip: Callable[[str], bool],
) -> list[str]:
    """Every component's own rules, asked with the run's :class:`Composition`. ``skip``
    says which node paths already have a range or type problem (their rules would read
    values of the wrong kind)."""
    problems: list[str] = []
    found: list[tuple[str, Any, dict[str, Any]]] = []
    for axis in AXES:
        for path, node in target_nodes(cfg.get(axis), axis):
            try:
                target = locate(node._target_)
            except Unimportable as err:
                problems.append(f"{path}._target_={node._target_!r} cannot be imported: {err}")
                continue
            args = own_args(node)
            if args is not None:
                found.append((path, target, args))
    explicit = frozenset(override_key(o) for o in overrides)
    trainer = own_args(cfg.trainer) if isinstance(cfg.get("trainer"), DictConfig) else None
    run = Composition(
        trainer=trainer or {},
        experts=experts,
        k=k,
        explicit=explicit,
        targets={path: target for path, target, _ in found if path in AXES},
        args={path: args for path, _, args in found if path in AXES},
        expert_targets=tuple(t for p, t, _ in found if p.startswith("expert")),
        choices=choices_from(overrides),
        options=group_options,
    )
    for path, target, args in found:
        rules = getattr(target, "config_problems", None)
        if callable(rules) and not skip(path):
            problems += rules(args, replace(run, path=path))
    return problems


def min_value(owner: Any, key: str) -> int | None:
    """The smallest integer the owner class allows for ``key``, if it declares one."""
    minimums: Mapping[str, int] = getattr(owner, "min_values", {}) or {}
    return minimums.get(key)
