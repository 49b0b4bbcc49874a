"""Verdict uncertainty: the seed bootstrap marks a claim that seed noise could flip as
inconclusive, keeps clear ones decided, and says when a grid has one run per cell."""

import pytest

from moe_exp.analysis.ablations import balance_loss
from moe_exp.analysis.verdicts import Verdict, assess
from tests.analysis.test_ablations import balance_runs

SPLIT_SEEDS = {  # [0.1,0.1]: one seed balances (0.2), the other does not (0.9); mean 0.55
    "[0,0]": [(2.0, 6.0, 0.95), (1.6, 5.0, 0.93)],
    "[0.1,0.1]": [(0.2, 1.3, 0.97), (0.9, 1.4, 0.96)],
    "[1,1]": [(0.1, 1.1, 0.96), (0.1, 1.1, 0.96)],
}


def by_claim(verdicts):
    return {v.claim.split(":")[0]: v for v in verdicts}


def test_a_claim_one_seed_could_flip_is_inconclusive(tmp_path):
    point = by_claim(balance_loss(balance_runs(tmp_path / "a", SPLIT_SEEDS)))
    test_cv = "any weight >= 0.1 balances the load at test (no noise)"
    assert point[test_cv].label == "does not hold"  # the mean alone: 0.55 > 0.5
    v = by_claim(assess(balance_loss, balance_runs(tmp_path / "b", SPLIT_SEEDS)))[test_cv]
    # a redraw keeps seed 0 twice (1/4: holds), seed 1 twice (1/4) or both (1/2): 0.55
    assert v.support == pytest.approx(0.25, abs=0.04)
    assert v.label == "inconclusive"
    assert (
        v.uncertainty == f"holds in {100 * v.support:.0f} % of 1000 seed redraws (2 runs per cell)"
    )


def test_a_claim_every_redraw_agrees_on_stays_decided(tmp_path):
    verdicts = assess(balance_loss, balance_runs(tmp_path))
    assert [v.label for v in verdicts] == ["holds"] * 4
    assert all(v.support == 1.0 and v.seeds == "2" for v in verdicts)
    collapse = verdicts[0]  # [0,0]: CV(load) 2.0 and 1.6, both > 1
    assert collapse.uncertainty == "holds in 100 % of 1000 seed redraws (2 runs per cell)"


def test_one_run_per_cell_has_no_interval_and_says_so(tmp_path):
    one_seed = {w: seeds[:1] for w, seeds in SPLIT_SEEDS.items()}
    verdicts = assess(balance_loss, balance_runs(tmp_path, one_seed))
    assert all(v.support is None for v in verdicts)
    assert verdicts[0].label == "holds"
    assert verdicts[0].uncertainty == "1 run per cell: no interval, a rerun may differ"


@pytest.mark.parametrize(
    ("holds", "support", "label"),
    [
        (True, 0.98, "holds"),
        (True, 0.97, "inconclusive"),
        (False, 0.03, "inconclusive"),
        (False, 0.02, "does not hold"),
        (True, 0.02, "inconclusive"),  # the means pass, the redraws do not
        (False, 0.98, "inconclusive"),
        (None, 0.5, "not checked"),
        (True, None, "holds"),
    ],
)
def test_the_label_follows_the_95_percent_interval(holds, support, label):
    assert Verdict("c", holds, "e", support=support, seeds="3").label == label
