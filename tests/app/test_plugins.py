"""A researcher's own components, in their own package and config folder, run through the CLI
with the same rules, metrics, plots and report as the built-ins."""

import json
import os
import sys
import textwrap

from moe_exp.analysis.report import build_report
from tests.conftest import TINY, run_app, run_cli, single_run_dir

PACKAGE = '''
import torch

from moe_exp.moe.gates.switch import SwitchGate
from moe_exp.moe.gates.topk import TopKGate


class StickySwitch(SwitchGate):
    """A user's top-1 gate: inherits the switch gate's rules (no k > 1)."""


class TemperedTopK(TopKGate):
    """A user's top-k gate with a rule of its own."""

    example_args = {"k": 2, "temperature": 2.0}

    @classmethod
    def config_problems(cls, args, run):
        problems = super().config_problems(args, run)
        if args.get("temperature", 1.0) > 10:
            problems.append(f"gate.temperature={args['temperature']} must be <= 10 for {run.path}")
        return problems

    def __init__(self, in_features, num_experts, k=2, capacity_factor=None, temperature=1.0):
        super().__init__(in_features, num_experts, k, capacity_factor)
        self.temperature = temperature

    def logits(self, h):
        return super().logits(h) / self.temperature
'''


def _plugin(tmp_path):
    package = tmp_path / "lab" / "mylab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "gates.py").write_text(PACKAGE)
    gates = tmp_path / "lab_conf" / "gate"
    gates.mkdir(parents=True)
    (gates / "sticky_switch.yaml").write_text(
        "_target_: mylab.gates.StickySwitch\n_partial_: true\ncapacity_factor: null\n"
    )
    (gates / "tempered.yaml").write_text(
        textwrap.dedent("""\
            _target_: mylab.gates.TemperedTopK
            _partial_: true
            k: ${k}
            temperature: 2.0
        """)
    )
    os.environ["PYTHONPATH"] = f"{tmp_path / 'lab'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return ["--config-dir", str(tmp_path / "lab_conf")]


def test_a_user_subclass_of_a_top1_gate_refuses_k2_like_the_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    extra = _plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "lab"))  # in this process, as PYTHONPATH does
    for name in [m for m in sys.modules if m.split(".")[0] == "mylab"]:
        monkeypatch.delitem(sys.modules, name)  # another test's package of the same name
    builtin = run_app(*TINY, "gate=switch", "k=2", cwd=tmp_path)
    mine = run_app(*extra, *TINY, "gate=sticky_switch", "k=2", cwd=tmp_path)
    assert builtin.returncode != 0 and mine.returncode != 0
    assert "k=2 asks for top-2 routing, but gate=switch is top-1 only" in builtin.stderr
    assert "k=2 asks for top-2 routing, but gate=sticky_switch is top-1 only" in mine.stderr
    assert "Traceback" not in mine.stderr
    own = run_app(*extra, *TINY, "gate=tempered", "gate.temperature=50", cwd=tmp_path)
    assert own.returncode != 0 and "gate.temperature=50 must be <= 10 for gate" in own.stderr


def test_a_user_gate_trains_with_the_builtin_metrics_plots_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    extra = _plugin(tmp_path)
    listed = run_cli(*extra, "--help", cwd=tmp_path)
    assert "tempered" in listed.stdout and "sticky_switch" in listed.stdout
    out = run_cli(*extra, *TINY, "plots=true", "gate=tempered", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = single_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and 0 <= summary["test/acc"] <= 1
    assert "epoch 1/1 [####################]" in out.stdout  # the script's own progress lines
    assert (run / summary["best_checkpoint"]).is_file() and (run / "metrics.csv").is_file()
    for key in ("test/cv_load", "test/cv_importance", "test/dead_experts", "test/nmi_label"):
        assert key in summary, key
    assert (run / "plots" / "expert_class.png").is_file()
    report = build_report([tmp_path / "outputs"], tmp_path / "report", plots=False)
    assert report["runs"] == 1 and "test/acc" in report["header"]
