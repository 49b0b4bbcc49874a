"""The gates (routers), one per file in this folder.

Every :class:`Router` subclass defined in a module here is exported under its class name and
listed in ``GATES`` (name -> class): adding a gate means adding its file (and its yaml under
``conf/gate/``), and the tests parametrised over ``GATES`` and the config tree cover it.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_exp.moe.gates.router import Router, top_k_routing


def _discover() -> dict[str, type[Router]]:
    found: dict[str, type[Router]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, value in vars(module).items():
            is_gate = isinstance(value, type) and issubclass(value, Router)
            if is_gate and value is not Router and value.__module__ == module.__name__:
                found[name] = value
    return found


GATES: dict[str, type[Router]] = _discover()
globals().update(GATES)

__all__ = ["GATES", "Router", "top_k_routing", *GATES]
