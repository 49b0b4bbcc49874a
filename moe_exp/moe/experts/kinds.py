"""Mixtures of several expert kinds (``expert=mixed``), and building E experts from a partial."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from moe_exp.moe.rules import Composition, require


def mixed(
    in_shape: Sequence[int], num_outputs: int, groups: Sequence[Mapping[str, Any]]
) -> list[nn.Module]:
    """Several kinds of expert in one mixture, e.g. 2 CNNs + 2 MLPs.

    ``groups`` is a list of ``{"count": n, "expert": partial}``; the experts are built in
    that order (so expert ids 0..n₀−1 are the first kind, and so on). Returns the whole
    list; :func:`build_experts` checks its length against the mixture's expert count.
    """
    if not groups:
        raise ValueError("expert=mixed needs at least one group of {count, expert}")
    experts: list[nn.Module] = []
    for i, group in enumerate(groups):
        if set(group) != {"count", "expert"}:
            raise ValueError(
                f"expert.groups[{i}] must have exactly the keys count and expert, "
                f"got {sorted(group)}"
            )
        count = int(group["count"])
        if count < 0:
            raise ValueError(f"expert.groups[{i}].count={count} must be >= 0")
        experts += [
            group["expert"](in_shape=tuple(in_shape), num_outputs=num_outputs) for _ in range(count)
        ]
    return experts


def mixed_problems(args: Mapping[str, Any], run: Composition) -> list[str]:
    """The group counts of ``expert=mixed`` must sum to the run's experts."""
    counts = [g.get("count") for g in args.get("groups") or [] if isinstance(g, Mapping)]
    typed = counts and all(isinstance(c, int) for c in counts)
    if typed and isinstance(run.experts, int) and sum(counts) != run.experts:
        return [
            f"expert.groups counts {counts} sum to {sum(counts)} but experts={run.experts}: "
            "make the counts sum to experts"
        ]
    return []


mixed.config_problems = mixed_problems  # the rule travels with the function Hydra calls


def _is_mixed(factory: Callable[..., Any]) -> bool:
    return isinstance(factory, functools.partial) and factory.func is mixed


def build_experts(
    factory: Callable[..., nn.Module | Sequence[nn.Module]],
    count: int,
    in_shape: Sequence[int],
    num_outputs: int,
) -> list[nn.Module]:
    """``count`` experts from an expert partial; a :func:`mixed` partial builds them all at
    once and must build exactly ``count`` (ValueError otherwise)."""
    if _is_mixed(factory):
        require(mixed_problems(factory.keywords, Composition(experts=count)))
        return list(factory(in_shape=tuple(in_shape), num_outputs=num_outputs))
    return [factory(in_shape=tuple(in_shape), num_outputs=num_outputs) for _ in range(count)]


def first_kind(factory: Callable[..., Any]) -> Callable[..., nn.Module]:
    """The single-expert partial of a factory: itself, or a mixed factory's first group's."""
    if _is_mixed(factory):
        return factory.keywords["groups"][0]["expert"]
    return factory
