"""``--help`` from the search path's folders: the same groups and config as Hydra's own help."""

import contextlib
import io
import sys

import pytest

from moe_exp.app.cli import _app, flags_first
from moe_exp.app.help import help_text


def _hydra_help(argv):
    out = io.StringIO()
    old, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
            _app()
    finally:
        sys.argv = old
    assert stop.value.code in (0, None)
    return out.getvalue()


def _groups(text):
    return {line for line in text.splitlines() if ": " in line and "/" not in line.split(":")[0]}


def test_the_fast_help_says_what_hydras_help_says(tmp_path):
    plugin = tmp_path / "conf" / "gate"
    plugin.mkdir(parents=True)
    (plugin / "mine.yaml").write_text("_target_: mylab.Mine\n")
    argv = ["moe-exp", "--config-dir", str(tmp_path / "conf"), "gate=switch", "experts=6", "--help"]
    fast = help_text(argv)
    assert fast is not None
    hydras = _hydra_help(argv)
    # Hydra lists private groups (data/_common) too; everything else is what print writes
    assert [line for line in hydras.splitlines() if "_common" not in line] == (
        f"{fast}\n".splitlines()
    )
    assert "mine" in next(line for line in _groups(fast) if line.startswith("gate:"))
    assert "experts: 6" in fast and "SwitchGate" in fast


def test_help_hydra_cannot_compose_is_left_to_hydra():
    assert help_text(["moe-exp", "gate=nope", "--help"]) is None
    assert help_text(["moe-exp", "--config-name", "other", "--help"]) is None


def test_overrides_may_follow_the_multirun_flag():
    argv = ["moe-exp", "gate=noisy_topk", "-m", "experts=4,8", "--config-dir", "d"]
    assert flags_first(argv) == [
        "moe-exp",
        "-m",
        "gate=noisy_topk",
        "experts=4,8",
        "--config-dir",
        "d",
    ]
