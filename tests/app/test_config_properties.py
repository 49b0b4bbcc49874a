"""A property-based search over the config tree (hypothesis): any choice of group options and
any values for the numeric, text and list keys of the config they compose either passes the
checks or fails with a clean message (a MoeExpError, or Hydra's own composition error), never
another exception; a sample of what passes also runs a few batches through the CLI's own code.

Seeded (``derandomize``) and bounded to stay in the default suite's time; ``-m slow`` draws
more. Shrunk examples of what it found are kept as plain tests in test_cli.py and
test_config.py.
"""

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

from moe_exp.app.config import validate
from moe_exp.errors import MoeExpError
from tests.conftest import TINY, compose_config, config_options, run_app

# groups a draw picks from: the five axes and what a run may swap; presets, debug, paths and
# hardware (gpu, ddp: refused without devices, checked in test_scaleout) are left out
DRAWN = ("data", "expert", "gate", "regularizer", "strategy", "model", "callbacks", "logger")
ON_FILES = {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "image_folder"}
OPTIONS = {
    group: sorted(o for g, o in config_options() if g == group and o not in ON_FILES)
    for group in DRAWN
}
ODD_VALUES = ["0", "-1", "1e12", "1e-12", "abc", "null", "true", "[1,2]", "''", "3.5", "-0.5"]
# text: a wrong name, empty, a number, a list, a path out of the folder, a name too long for
# any filesystem (255 bytes), characters a path may not hold; never an absolute path, which
# a micro run could create
ODD_TEXT = ["xyz", "''", "1", "null", "true", "[a]", "'a b'", "..", "x" * 300, "'a/b'", "-1"]
ODD_LISTS = ["[]", "[xyz]", "[1,2,3]", "[[1]]", "abc", "null", "[0.5,-1]", "['']"]
SETTINGS = dict(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, kind) of every number, text and list in the composed config (not
    Hydra's, not interpolations); kind is "number", "text" or "list"."""
    if isinstance(node, DictConfig):
        for key in node:
            if str(key).startswith("_") or OmegaConf.is_interpolation(node, key):
                continue
            try:
                value = node[key]
            except Exception:  # a value that does not resolve: nothing to draw
                continue
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        yield path, "list"
    elif isinstance(node, str):
        yield path, "text"
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, "number"


def odd_value(kind: str) -> st.SearchStrategy[str]:
    if kind == "text":
        return st.sampled_from(ODD_TEXT)
    if kind == "list":
        return st.sampled_from(ODD_LISTS)
    return st.one_of(
        st.sampled_from(ODD_VALUES),
        st.integers(-2, 40).map(str),
        st.floats(-2, 4, allow_nan=False).map(lambda v: f"{v:.3g}"),
    )


@st.composite
def configurations(draw: Any) -> list[str]:
    """Overrides: group options, then odd or ordinary values for keys they compose."""
    overrides = [
        f"{group}={draw(st.sampled_from(options))}"
        for group, options in OPTIONS.items()
        if draw(st.booleans())
    ]
    kinds = dict(leaves(compose_config([*TINY, *overrides])))
    for key in draw(st.lists(st.sampled_from(sorted(kinds)), max_size=3, unique=True)):
        overrides.append(f"{key}={draw(odd_value(kinds[key]))}")
    return overrides


def check(overrides: list[str]) -> bool:
    """True when the configuration passes the checks; False for a clean refusal; anything
    else fails the test with the overrides that caused it."""
    try:
        cfg = compose_config([*TINY, *overrides])
    except HydraException:  # Hydra's own message (a wrong type for a typed key, ...)
        return False
    try:
        validate(cfg, overrides)
    except MoeExpError:
        return False
    return True


@settings(max_examples=20, **SETTINGS)
@given(configurations())
def test_every_drawn_configuration_passes_or_is_refused_cleanly(overrides):
    check(overrides)


@settings(max_examples=2, **SETTINGS)
@given(overrides=configurations())
def test_drawn_configurations_that_pass_run_a_few_batches(overrides, tmp_path_factory):
    # only what passes the checks runs: hypothesis draws until it has such a configuration
    assume("logger=wandb" not in overrides and check(overrides))
    base = tmp_path_factory.mktemp("draw")
    root = base / "a" / "b"  # a drawn output folder of ".." stays inside base
    root.mkdir(parents=True)
    out = run_app(*TINY, *overrides, "debug=fdr", cwd=root)
    summaries = list(base.rglob("summary.json"))
    if not summaries:  # refused before a run folder existed (one that cannot be created)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (overrides, out.stderr)
        return
    record = json.loads(summaries[0].read_text())
    clean = record["status"] == "debug" or str(record.get("error", "")).startswith(
        ("ConfigError", "DivergedError", "DataNotFoundError", "MoeExpError")
    )
    assert clean, (overrides, record.get("error"), out.stderr[-2000:])


@pytest.mark.slow
@settings(max_examples=600, **SETTINGS)
@given(configurations())
def test_many_drawn_configurations_pass_or_are_refused_cleanly(overrides):
    check(overrides)
