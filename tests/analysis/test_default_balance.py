"""The default run's balance contract: every expert carries work, not only inputs."""

import json

import pytest

from tests.conftest import single_run_dir


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])  # the two seeds that left an expert idle at 0.1/0.1
def test_every_expert_of_the_default_run_carries_at_least_a_tenth_of_the_weight(
    app, tmp_path, seed
):
    out = app(f"seed={seed}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((single_run_dir(tmp_path) / "summary.json").read_text())
    shares = [summary[f"test/importance_e{e}"] for e in range(4)]
    assert min(shares) >= 0.10, shares
    assert summary["test/dead_experts"] == 0 and summary["test/effective_experts"] > 3.5
    assert summary["test/acc"] >= 0.99
