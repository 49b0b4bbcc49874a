"""Expert networks by kind (dense, conv, tree), mixtures of kinds, and the stacked MLP bank.

Each expert takes ``(in_shape, num_outputs, ...)``, so any expert fits any mixture. ``EXPERTS``
maps the name of every such class defined in a module of this folder to the class: a new
kind is one file (and its yaml under ``conf/expert/``), and the expert tests cover it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

from moe_exp.moe.experts.conv import CNNExpert, ResNetExpert
from moe_exp.moe.experts.dense import LinearExpert, MLPExpert, check_dropout
from moe_exp.moe.experts.kinds import build_experts, first_kind, mixed
from moe_exp.moe.experts.tree import SoftTreeExpert, TreeBalanceLoss


def _is_expert(value: object, module: str) -> bool:
    if not (isinstance(value, type) and issubclass(value, nn.Module)):
        return False
    if value.__module__ != module or value.__name__.startswith("_"):
        return False
    names = list(inspect.signature(value).parameters)
    return names[:2] == ["in_shape", "num_outputs"]


def _discover() -> dict[str, type[nn.Module]]:
    found: dict[str, type[nn.Module]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found |= {n: v for n, v in vars(module).items() if _is_expert(v, module.__name__)}
    return found


EXPERTS: dict[str, type[nn.Module]] = _discover()

__all__ = [
    "EXPERTS",
    "CNNExpert",
    "LinearExpert",
    "MLPExpert",
    "ResNetExpert",
    "SoftTreeExpert",
    "TreeBalanceLoss",
    "build_experts",
    "check_dropout",
    "first_kind",
    "mixed",
]
