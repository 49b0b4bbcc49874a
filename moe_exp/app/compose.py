"""Where the config tree lives, and the config a run with given overrides gets.

The top-level ``conf/`` is the one tree: a checkout uses it in place, a wheel carries it
inside the package (``moe_exp/conf``). Only Hydra is imported, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def config_dir() -> str:
    """The config tree: inside the package in a wheel, the repo's ``conf/`` in a checkout."""
    here = Path(__file__).resolve().parents[1]  # the moe_exp package
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"moe-exp's config tree was not found next to {here}")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a run with these overrides would get (for notebooks, tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b=1`` → ``a.b``, ``~x`` → ``x``."""
    return override.lstrip("+~").split("=", 1)[0]
