"""``moe-exp --help`` answered from the search path's folders, with one composition.

Hydra's help reloads its whole config repository once for every group, its own ``hydra/``
groups included, so its cost grows with the tree. The same text comes from listing the files
of each folder on the search path (the packaged tree, ``--config-dir``,
``hydra.searchpath``) and composing the config once. Anything this cannot answer the same
way (``--config-name``, a help template with Hydra's flag list, a composition error) is left
to Hydra itself.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from moe_exp.app.compose import config_dir

HELP_FLAGS = ("--help", "-h")
SEARCHPATH = "hydra.searchpath"


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv[1:])


def _folder(entry: str) -> Any:
    """The folder a search-path entry names (``file://``, ``pkg://`` or a plain path)."""
    scheme, sep, rest = entry.partition("://")
    if not sep:
        return Path(entry)
    if scheme == "pkg":
        return resources.files(rest.replace("/", "."))
    return Path(rest)


def _options(folder: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    """(group, option) for every yaml file below ``folder``; private (``_``) and Hydra's own
    groups are left out, as Hydra's help leaves its groups out of the app's list."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        name = child.name
        if child.is_dir() and not name.startswith(("_", ".")) and f"{prefix}{name}" != "hydra":
            yield from _options(child, f"{prefix}{name}/")
        elif prefix and name.endswith(".yaml"):
            yield prefix.rstrip("/"), name.removesuffix(".yaml")


def config_groups(searchpath: Sequence[str]) -> str:
    """``group: option, option`` lines, as Hydra's help writes them."""
    groups: dict[str, set[str]] = {}
    for entry in searchpath:
        for group, option in _options(_folder(entry)):
            groups.setdefault(group, set()).add(option)
    return "".join(f"{g}: {', '.join(sorted(groups[g]))}\n" for g in sorted(groups))


def _with_config_dir(overrides: list[str], extra: str | None) -> list[str]:
    """The overrides, with ``--config-dir`` added to ``hydra.searchpath`` as Hydra adds it."""
    if not extra:
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entry = f"file://{Path(extra).resolve()}"
    kept, searchpath = [], []
    for override in overrides:
        if override.split("=", 1)[0] == SEARCHPATH:
            value = OverridesParser.create().parse_override(override).value()
            searchpath = list(value) if isinstance(value, list) else [value]
        else:
            kept.append(override)
    listed = ",".join(f"'{p}'" for p in [*searchpath, entry])
    return [*kept, f"{SEARCHPATH}=[{listed}]"]


def help_text(argv: Sequence[str]) -> str | None:
    """The help for this command line, or None where Hydra must answer it."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf, open_dict

    args = get_args_parser().parse_args(list(argv[1:]))
    if args.config_name or args.config_path:
        return None
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            overrides = _with_config_dir(list(args.overrides), args.config_dir)
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception:  # Hydra's own path reports composition errors in its own words
        return None
    template = str(cfg.hydra.help.template)
    if "$FLAGS_HELP" in template or "$HYDRA_CONFIG_GROUPS" in template:
        return None
    searchpath = [config_dir(), *cfg.hydra.searchpath]
    with open_dict(cfg):
        del cfg["hydra"]
    return string.Template(template).substitute(
        APP_CONFIG_GROUPS=config_groups(searchpath),
        CONFIG=OmegaConf.to_yaml(cfg, resolve=args.resolve),
    )
