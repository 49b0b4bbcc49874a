"""Verdicts with their uncertainty: what a check reads (:class:`Results`, means over the
completed runs of a grid cell), what it says (:class:`Verdict`), and how sure it can be.

A check compares means over seeds with a threshold, so one unlucky seed can flip it. The
seed bootstrap (Efron & Tibshirani 1993, ch. 6) asks how often: it redraws each grid cell's
runs with replacement, reruns the check on every redraw and counts how often each claim
holds. A claim that holds in more than 2.5 % and fewer than 97.5 % of the redraws has a 95 %
interval that straddles its threshold, and is **inconclusive** (as is one whose redraws
nearly all disagree with the verdict of the means).
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

REDRAWS = 1000
LEVEL = 0.95  # a claim is decided only when it holds (or fails) in this share of redraws


class GroupLike(Protocol):
    """One grid cell: its swept parameters, its number of completed runs and one value per
    completed run (nan where a run lacks the metric)."""

    params: dict[str, str]

    @property
    def size(self) -> int: ...

    def values(self, metric: str) -> list[float]: ...


@dataclass(frozen=True)
class Verdict:
    claim: str
    holds: bool | None  # None: the runs it needs are missing
    evidence: str
    support: float | None = None  # share of seed redraws in which the claim holds
    seeds: str = ""  # runs per grid cell, e.g. "2" or "1-3"

    @property
    def label(self) -> str:
        if self.holds is None:
            return "not checked"
        if self.support is not None:  # decided only where the redraws agree with the means
            agree = self.support if self.holds else 1 - self.support
            if agree < 1 - (1 - LEVEL) / 2:
                return "inconclusive"
        return "holds" if self.holds else "does not hold"

    @property
    def uncertainty(self) -> str:
        """One clause on how sure the verdict is, for the report."""
        if self.holds is None or not self.seeds:
            return ""
        if self.support is None:
            return f"{self.seeds} run per cell: no interval, a rerun may differ"
        return (
            f"holds in {100 * self.support:.0f} % of {REDRAWS} seed redraws "
            f"({self.seeds} runs per cell)"
        )


class Results:
    """Means over seeds, looked up by the swept parameters (values as in the overrides)."""

    def __init__(self, groups: Sequence[GroupLike]) -> None:
        self.groups = list(groups)

    def values(self, key: str) -> list[str]:
        return sorted({g.params[key] for g in self.groups if key in g.params}, key=value_order)

    def mean(self, metric: str, **where: str) -> float:
        """Mean of ``metric`` over the completed runs of every group matching ``where``.

        Keys with dots (``data.n_train``) are passed with ``__`` (``data__n_train``); a key
        the sweep did not vary counts as ``"default"``, as in the report's table."""
        wanted = {k.replace("__", "."): str(v) for k, v in where.items()}
        values = [
            v
            for g in self.groups
            if all(g.params.get(k, "default") == v for k, v in wanted.items())
            for v in g.values(metric)
            if not math.isnan(v)
        ]
        return math.fsum(values) / len(values) if values else math.nan

    def redrawn(self, rng: random.Random) -> Results:
        """The same grid with each cell's runs drawn again, with replacement."""
        return Results([_Redrawn(g, rng) for g in self.groups])

    def seeds_per_cell(self) -> str:
        counts = [g.size for g in self.groups]
        lo, hi = min(counts, default=0), max(counts, default=0)
        return str(lo) if lo == hi else f"{lo}-{hi}"


class _Redrawn:
    """A grid cell whose runs are redrawn once, so that all its metrics come from the same
    runs."""

    def __init__(self, group: GroupLike, rng: random.Random) -> None:
        self.params, self.size, self._group = group.params, group.size, group
        self._picks = [rng.randrange(self.size) for _ in range(self.size)]

    def values(self, metric: str) -> list[float]:
        values = self._group.values(metric)
        return [values[i] for i in self._picks]


def assess(
    check: Callable[..., list[Verdict]], results: Results, redraws: int = REDRAWS, **options
) -> list[Verdict]:
    """The check's verdicts, each with the share of seed redraws in which it holds (none
    when every cell has a single run, which a redraw cannot vary)."""
    verdicts = check(results, **options)
    seeds = results.seeds_per_cell()
    if all(g.size < 2 for g in results.groups):
        return [replace(v, seeds=seeds) for v in verdicts]
    rng = random.Random(0)
    held = [0] * len(verdicts)
    for _ in range(redraws):
        again = check(results.redrawn(rng), **options)
        for i, (v, w) in enumerate(zip(verdicts, again, strict=False)):
            held[i] += bool(w.holds) and w.claim == v.claim
    return [
        replace(v, support=h / redraws, seeds=seeds) if v.holds is not None else v
        for v, h in zip(verdicts, held, strict=True)
    ]


CHECK_MODULES = ("moe_exp.analysis.ablations", "moe_exp.analysis.questions")


def known_checks() -> dict[str, Callable[..., list[Verdict]]]:
    """The checks a preset's ``ablation.check`` may name, by dotted name: the public
    functions of :data:`CHECK_MODULES` whose first argument is the :class:`Results` (the
    report calls nothing else)."""
    found = {}
    for module in map(importlib.import_module, CHECK_MODULES):
        for name, value in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(value):
                continue
            first = next(iter(inspect.signature(value).parameters.values()), None)
            takes_results = first is not None and first.annotation in ("Results", Results)
            if value.__module__ == module.__name__ and takes_results:
                found[f"{module.__name__}.{name}"] = value
    return found


def value_order(value: str) -> tuple[int, float | str]:
    """Sort key for parameter values: numbers ascending, then anything else by name."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def verdict(
    claim: str, values: Iterable[float], test: Callable[[], bool], evidence: str
) -> Verdict:
    """A claim decided by ``test``, or *not checked* when a value it needs is missing."""
    if any(math.isnan(v) for v in values):
        return Verdict(claim, None, evidence + " (some runs are missing)")
    return Verdict(claim, bool(test()), evidence)
