"""The GPU check runs on the CPU path here, so the script cannot rot before a GPU is lent:
every run and sweep it starts completes, and its tolerance checks are computed."""

import importlib.util
import json
from pathlib import Path

from tests.conftest import run_app

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_on_the_cpu_path(tmp_path):
    bench = load_script()
    out = tmp_path / "gpu.json"
    code = bench.main(
        ["--device", "cpu", "--quick", "--out", str(out)],
        run=lambda args, cwd: run_app(*args, cwd=cwd).returncode,
    )
    result = json.loads(out.read_text())
    # on the CPU the device's fp32 run is the reference itself
    assert set(result["default_runs"]) == {"cpu fp32", "cpu bf16-mixed"}
    checks = result["checks"]
    # what must hold wherever it runs: every run and both sweep jobs complete, and the
    # layer's output is the CPU's; tiny one-epoch runs may differ between fp32 and bf16
    assert all(ok for claim, ok in checks.items() if claim.endswith("completed")), checks
    assert checks["sweep: both jobs completed"]
    (layer_check,) = [c for c in checks if c.startswith("layer output")]
    assert checks[layer_check]
    assert "cpu bf16-mixed: test/acc within 2.0 points of the CPU" in checks
    assert {(r["experts"], r["k"]) for r in result["layer"]} == {(8, 1), (64, 1), (8, 2), (64, 2)}
    assert code == (0 if all(checks.values()) else 1)
