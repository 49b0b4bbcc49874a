"""The ``moe-exp`` console script: a Hydra app over the top-level ``conf/`` tree.

Only Hydra is imported here; torch and Lightning load inside the task, so ``--help`` and
``--cfg job`` answer fast.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """The config tree: inside the package in a wheel, the repo's ``conf/`` in a checkout."""
    here = Path(__file__).resolve().parent
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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from moe_exp.run import run

    hydra_cfg = HydraConfig.get()
    return run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
