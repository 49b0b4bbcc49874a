"""What a component requires of the run it is part of, stated on its own class.

A gate, expert, regularizer, model or strategy may define the classmethod
``config_problems(args, run) -> list[str]``: ``args`` are its own config values, ``run`` the
:class:`Composition` it is part of. It returns one message per broken rule, naming the key,
the bad value and what is allowed. The app's config checks find the class from each node's
``_target_`` and call it before anything is built; the class's constructor calls the same
method through :func:`require`, so each rule lives in one place, a subclass inherits it and a
user's own class can add its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


def _no_options(axis: str, accepts: Callable[[Any], bool]) -> list[str]:
    return []


@dataclass(frozen=True)
class Composition:
    """The run as the rules see it: the top-level counts and what each axis builds."""

    experts: int | None = None  # the run's ``experts`` (None when it is not a valid count)
    k: int | None = None  # the run's ``k``
    explicit: frozenset[str] = frozenset()  # keys the command line (or sweep) set itself
    targets: Mapping[str, Any] = field(default_factory=dict)  # axis -> class its node builds
    args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # axis -> its values
    expert_targets: tuple[Any, ...] = ()  # every class the expert node builds (mixed groups)
    choices: Mapping[str, str] = field(default_factory=dict)  # axis -> the option chosen
    path: str = ""  # the dotted config path of the node whose rules are asked
    trainer: Mapping[str, Any] = field(default_factory=dict)  # the Trainer's arguments
    # the options of a config group whose target passes a test (for "use one of ..." hints)
    options: Callable[[str, Callable[[Any], bool]], list[str]] = _no_options

    def name(self, axis: str) -> str:
        """The option chosen for ``axis`` (``gate=switch``), else its class's name."""
        if axis in self.choices:
            return self.choices[axis]
        return getattr(self.targets.get(axis), "__name__", "this " + axis)

    def builds_experts(self, kind: type) -> bool:
        """Whether the model builds experts from the expert config and one of them is a
        ``kind`` (a model with ``uses_expert_config = False`` builds its own)."""
        if not getattr(self.targets.get("model"), "uses_expert_config", True):
            return False
        return any(isinstance(t, type) and issubclass(t, kind) for t in self.expert_targets)


def below_minimum(cls: type, values: Mapping[str, Any]) -> list[str]:
    """Messages for ``values`` under the class's ``min_values`` (key -> smallest integer; a
    list is checked entry by entry): where one key name means different things by owner, a
    soft tree's ``depth`` must be >= 1 while an MLP's may be 0."""
    problems = []
    for key, low in getattr(cls, "min_values", {}).items():
        value = values.get(key)
        entries = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and (not entries or any(v < low for v in entries)):
            problems.append(f"{key}={value} must be >= {low}")
    return problems


def require(problems: list[str]) -> None:
    """Raise the ValueError a constructor raises for its own broken rules."""
    if problems:
        raise ValueError("; ".join(problems))
