"""Ablation verdicts: each check against hand-made run folders whose numbers make it hold or
fail, the report's verdict section, and (slow) every preset reduced to 2 grid points."""

import json
import math
from pathlib import Path

import pytest
import yaml

from moe_exp.analysis.ablations import (
    Results,
    _spearman,
    balance_loss,
    bias_balance,
    clusters,
    overfitting,
)
from moe_exp.analysis.report import build_report, find_runs, group_runs, swept_parameters
from moe_exp.analysis.reproduce import presets, sweeps
from tests.conftest import TINY_DATA, run_cli


def write_run(root: Path, name: str, overrides: list[str], status="completed", spec=None, **m):
    folder = root / name
    folder.mkdir(parents=True)
    summary = {"status": status, "overrides": overrides, **m}
    (folder / "summary.json").write_text(json.dumps(summary))
    if spec:
        (folder / "config.yaml").write_text(yaml.safe_dump({"ablation": spec}))
    return folder


def results_of(root: Path) -> Results:
    runs = find_runs([root])
    return Results(group_runs(runs, swept_parameters(runs)))


BALANCE = {  # weights → (cv_load, max_mean_load, acc) for seeds 0 and 1
    "[0,0]": [(2.0, 6.0, 0.95), (1.6, 5.0, 0.93)],
    "[0.1,0.1]": [(0.2, 1.3, 0.97), (0.3, 1.4, 0.96)],
    "[1,1]": [(0.1, 1.1, 0.96), (0.1, 1.1, 0.96)],
}


def balance_runs(root: Path, table=BALANCE) -> Results:
    for w, seeds in table.items():
        for seed, (cv, mm, acc) in enumerate(seeds):
            write_run(
                root,
                f"{w}-{seed}",
                [f"balance_weights={w}", f"seed={seed}"],
                **{
                    "test/cv_load": cv,
                    "train/cv_load": cv / 2,
                    "test/max_mean_load": mm,
                    "test/acc": acc,
                },
            )
    return results_of(root)


def test_means_are_over_the_completed_runs_of_the_matching_groups(tmp_path):
    results = balance_runs(tmp_path)
    assert results.values("balance_weights") == ["[0,0]", "[0.1,0.1]", "[1,1]"]
    assert results.mean("test/cv_load", balance_weights="[0,0]") == pytest.approx(1.8)
    assert results.mean("test/acc") == pytest.approx(
        sum(a for s in BALANCE.values() for *_, a in s) / 6
    )
    assert math.isnan(results.mean("test/acc", balance_weights="[5,5]"))  # no such runs


def test_balance_verdicts_hold_on_balanced_numbers(tmp_path):
    verdicts = balance_loss(balance_runs(tmp_path))
    assert [v.holds for v in verdicts] == [True, True, True, True]
    assert "CV(load) 1.80, max/mean 5.50" in verdicts[0].evidence
    assert "[0.1,0.1]: 0.125" in verdicts[2].evidence  # the training-time CV
    assert "from 0.9600 to 0.9650 (spread 0.50 points)" in verdicts[3].evidence


def test_balance_verdicts_fail_when_the_numbers_say_so(tmp_path):
    table = {**BALANCE, "[0.1,0.1]": [(0.7, 2.0, 0.90), (0.6, 2.0, 0.90)]}
    verdicts = balance_loss(balance_runs(tmp_path, table))
    assert [v.holds for v in verdicts] == [True, False, True, False]  # train CV 0.33 < 0.5
    assert verdicts[3].label == "does not hold"


def test_a_claim_whose_runs_failed_is_not_checked(tmp_path):
    write_run(tmp_path, "a", ["gate=topk", "regularizer=switch"], status="diverged")
    write_run(
        tmp_path,
        "b",
        ["gate=bias_balanced", "regularizer=none"],
        **{"test/max_vio": 0.1, "test/acc": 0.9},
    )
    verdicts = bias_balance(results_of(tmp_path))
    assert [v.holds for v in verdicts] == [None, None, None]
    assert all(v.label == "not checked" for v in verdicts)


def test_bias_balance_is_checked_for_each_update_rate(tmp_path):
    arms = {  # (gate, regularizer, γ): (test MaxVio, train MaxVio, test acc)
        ("topk", "switch", None): (1.0, 1.0, 0.990),
        ("topk", "none", None): (2.0, 2.0, 0.990),
        ("bias_balanced", "none", None): (0.5, 0.2, 0.985),
        ("bias_balanced", "none", "0.01"): (1.5, 0.1, 0.950),
    }
    for i, ((gate, reg, rate), (test, train, acc)) in enumerate(arms.items()):
        extra = [f"gate.bias_update_rate={rate}"] if rate else []
        write_run(
            tmp_path, str(i), [f"gate={gate}", f"regularizer={reg}", *extra],
            **{"test/max_vio": test, "train/max_vio": train, "test/acc": acc},
        )  # fmt: skip
    verdicts = bias_balance(results_of(tmp_path))
    assert [v.claim.split(":")[0] for v in verdicts] == ["γ = 0.01"] * 3 + ["γ = 0.001 (paper)"] * 3
    assert [v.holds for v in verdicts] == [False, True, False, True, True, True]


def test_cluster_verdict_compares_gains_not_accuracies(tmp_path):
    accs = {  # (clusters, experts, expert) → acc: the MoE gains 5 points only on clusters
        ("[]", "1", "cnn"): 0.90, ("[]", "4", "cnn"): 0.90,
        ("[a]", "1", "cnn"): 0.80, ("[a]", "4", "cnn"): 0.85,
        ("[]", "1", "linear"): 0.70, ("[]", "4", "linear"): 0.71,
        ("[a]", "1", "linear"): 0.60, ("[a]", "4", "linear"): 0.66,
    }  # fmt: skip
    for i, ((c, e, kind), acc) in enumerate(accs.items()):
        write_run(
            tmp_path, str(i), [f"data.clusters={c}", f"experts={e}", f"expert={kind}"],
            **{"test/acc": acc},
        )  # fmt: skip
    holds = [v.holds for v in clusters(results_of(tmp_path))]
    assert holds == [True, False]  # linear gains 6 points > cnn's 5


def test_overfitting_verdict_reads_the_small_set_and_ignores_the_dense_runs(tmp_path):
    for e, gap in (("1", 0.05), ("4", 0.10), ("16", 0.20)):
        for drop, shrink in (("0.0", 0.0), ("0.4", 0.03)):
            for fraction, scale in (("0.05", 1.0), ("1.0", 0.1)):
                write_run(
                    tmp_path, f"{e}-{drop}-{fraction}",
                    [f"experts={e}", f"expert.dropout={drop}", f"data.train_fraction={fraction}"],
                    **{"gap/acc_eval": scale * (gap - shrink), "val/acc": 0.8 - shrink},
                )  # fmt: skip
    write_run(  # a dense baseline with a huge gap must not enter the mixtures' trend
        tmp_path / "also0", "d",
        ["model=dense_flops", "experts=4", "expert.dropout=0.0", "data.train_fraction=0.05"],
        **{"gap/acc_eval": 0.9},
    )  # fmt: skip
    more, trend, dropout, regularises = overfitting(results_of(tmp_path))
    assert more.holds and "E=1: 5.00, E=4: 10.00, E=16: 20.00 points" in more.evidence
    assert "dense_flops: 90.00" in more.evidence
    assert trend.holds and "ρ = +1.00" in trend.evidence
    assert dropout.holds and "dropout 0.0: 11.67, dropout 0.4: 8.67 points" in dropout.evidence
    assert not regularises.holds  # the gap shrank, but so did val/acc (0.80 → 0.77)


def test_the_overfitting_preset_adds_its_dense_baselines_and_small_set_seeds(tmp_path):
    main, dense, seeds = sweeps("ablation_overfitting", tmp_path, ["seed=3"])
    assert main == [
        "experiment=ablation_overfitting",
        f"hydra.sweep.dir={tmp_path}",
        "plots=false",  # the verdicts read summaries only
        "seed=3",
    ]
    assert dense[1:] == [
        f"hydra.sweep.dir={tmp_path / 'also0'}",
        "model=dense_flops,dense_params",
        "experts=4",
        "plots=false",
        "seed=3",
    ]
    # the cells that decide the first two claims get more seeds (the user's seed still wins)
    assert seeds[2:] == [
        "data.train_fraction=0.05",
        "expert.dropout=0.0",
        "seed=2,3,4",
        "plots=false",
        "seed=3",
    ]


def test_sweeps_run_side_by_side_and_keep_the_pictures_a_preset_asks_for(tmp_path):
    (main,) = sweeps("shape_colour_specialisation", tmp_path, ["plots=false"], jobs=2)
    assert main[2:] == ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "plots=false"]
    (main,) = sweeps("shape_colour_specialisation", tmp_path, jobs=2)
    assert "plots=false" not in main
    # a preset whose claim compares training speed runs one job at a time
    main, baselines = sweeps("compute_scaling", tmp_path, jobs=2)
    assert not any("launcher" in arg for arg in [*main, *baselines])


def test_spearman_rank_correlation():
    assert _spearman([1, 2, 4, 8], [0.1, 0.2, 0.3, 0.5]) == pytest.approx(1.0)
    assert _spearman([1, 2, 4, 8], [0.5, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert _spearman([1, 2, 3], [1, 1, 1]) == 0.0


def test_report_writes_verdicts_and_the_published_table(tmp_path):
    spec = {
        "title": "Balance",
        "check": {"_target_": "moe_exp.analysis.ablations.balance_loss", "_partial_": True},
        "metrics": ["test/acc", "test/cv_load"],
        "published": {"header": ["w", "CV(load)"], "rows": [[0.0, 3.01]]},
    }
    balance_runs(tmp_path / "runs")
    write_run(tmp_path / "runs", "spec", ["balance_weights=[0,0]", "seed=9"], "failed", spec)
    table = build_report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert table["header"][:3] == ["balance_weights", "test/acc", "test/cv_load"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Balance\n") and "## Verdicts" in md and "| 0.0 | 3.01 |" in md
    saved = json.loads((tmp_path / "out" / "verdicts.json").read_text())
    assert [v["verdict"] for v in saved] == ["holds"] * 4


@pytest.mark.parametrize(
    ("check", "note"),
    [
        ({"_target_": "os.system", "command": "touch planted"}, "is not one of"),
        ({"_target_": "moe_exp.analysis.ablations.balance_loss", "nope": 1}, "failed"),
    ],
)
def test_a_planted_check_runs_no_code_and_the_rest_of_the_report_is_written(tmp_path, check, note):
    """A run folder from elsewhere names a callable: the report looks checks up by name in its
    own table, calls nothing else, says so in one line and writes the rest."""
    spec = {"title": "Planted", "check": check, "metrics": ["test/acc"]}
    balance_runs(tmp_path / "runs")
    write_run(tmp_path / "runs", "spec", ["balance_weights=[0,0]", "seed=9"], "completed", spec)
    table = build_report([tmp_path / "runs"], tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert len(table["rows"]) == 3 and "| balance_weights | test/acc |" in md  # the table
    assert "> no verdicts: ablation.check" in md and note in md and "## Verdicts" not in md
    assert not list(tmp_path.rglob("planted")) and not Path("planted").exists()


PRESETS = {  # each preset reduced to 2 grid points (command-line sweeps win over the preset's)
    "ablation_balance": ["balance_weights=[0,0],[1,1]"],
    "ablation_bias_balance": ["gate=bias_balanced", "regularizer=none,switch"],
    "ablation_clusters": ["experts=1,4", "expert=linear", "data.clusters=[rotate90]"],
    "ablation_overfitting": ["experts=1,2", "data.train_fraction=0.5", "expert.dropout=0.4",
                             "trainer.max_steps=4"],
    "shape_colour_specialisation": ["strategy=joint,hierarchical_attribute"],
    "strategies": ["strategy=joint,em", "data=shapes"],
    "gate_features": ["data.target=shape", "model.gate_input=image,grey"],
    "compute_scaling": ["experts=2,4", "gate=noisy_topk"],
    "modular_experts": ["seed=0,1"],  # the base sweep only: the arms need its checkpoints
}  # fmt: skip
# the other presets' claims compare 4+ grid points: reduced, each says "not checked"
CHECKABLE_WHEN_REDUCED = {
    "ablation_balance",
    "gate_features",
    "shape_colour_specialisation",
    "strategies",
}
TINY = [*TINY_DATA, "trainer.max_epochs=1", "seed=0"]


def test_every_ablation_preset_has_a_reduced_test():
    assert presets() == sorted(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_runs_reduced_and_reports_a_verdict(preset, tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        f"experiment={preset}", f"hydra.sweep.dir={sweep}", *TINY, *PRESETS[preset], cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = find_runs([sweep])
    assert len(runs) == 2 and all(r.status == "completed" for r in runs)
    table = build_report([sweep], tmp_path / "report", plots=False)
    assert table["verdicts"], "the preset's check gave no verdict"
    labels = {"holds", "does not hold", "inconclusive", "not checked"}
    assert {v.label for v in table["verdicts"]} <= labels
    checked = any(v.holds is not None for v in table["verdicts"])
    assert checked == (preset in CHECKABLE_WHEN_REDUCED), [v.label for v in table["verdicts"]]
    assert "## Verdicts" in (tmp_path / "report" / "report.md").read_text()


def test_gate_features_reads_what_the_gate_routes_on_by_view(tmp_path):
    from moe_exp.analysis.questions import gate_features

    table = {  # (target, view) → (NMI shape, NMI colour, test/acc)
        ("shape", "image"): (0.05, 0.80, 0.99),
        ("shape", "grey"): (0.60, 0.20, 0.99),
        ("colour", "image"): (0.10, 0.90, 0.99),
        ("colour", "grey"): (0.50, 0.30, 0.97),  # the gate cannot see what the label needs
    }
    for (target, view), (shape, colour, acc) in table.items():
        for seed in (0, 1):
            write_run(
                tmp_path, f"{target}-{view}-{seed}",
                [f"data.target={target}", f"model.gate_input={view}", f"seed={seed}"],
                **{"test/nmi_shape": shape, "test/nmi_colour": colour, "test/acc": acc},
            )  # fmt: skip
    by_colour, by_shape, accuracy = gate_features(results_of(tmp_path))
    assert (
        by_colour.holds and "target colour: NMI(shape) 0.10, NMI(colour) 0.90" in by_colour.evidence
    )
    assert by_shape.holds and "target shape: NMI(shape) 0.60, NMI(colour) 0.20" in by_shape.evidence
    assert not accuracy.holds and "largest drop: colour with grey, 2.00 points" in accuracy.evidence
    for run in tmp_path.glob("*-grey-*"):  # the whole image alone: nothing to compare it with
        (run / "summary.json").unlink()
    (unchecked,) = gate_features(results_of(tmp_path))
    assert unchecked.holds is None and "needs model.gate_input swept" in unchecked.evidence


def test_compute_scaling_reads_flops_throughput_and_accuracy_per_expert_count(tmp_path):
    from moe_exp.analysis.questions import compute_scaling

    for e, sparse_speed in ((2, 1000.0), (8, 900.0), (32, 700.0)):
        for seed in (0, 1):
            common = [f"experts={e}", f"seed={seed}"]
            write_run(
                tmp_path, f"s{e}-{seed}", [*common, "gate=noisy_topk"],
                flops_active=10e6 + 1e3 * e, train_samples_per_s=sparse_speed,
                **{"test/acc": 0.99},
            )  # fmt: skip
            write_run(
                tmp_path, f"d{e}-{seed}", [*common, "gate=softmax"],
                flops_active=1e6 + 5e6 * e, train_samples_per_s=100.0, **{"test/acc": 0.995},
            )  # fmt: skip
    flat, linear, speed, accuracy = compute_scaling(results_of(tmp_path))
    assert flat.holds and "MFLOPs E=2: 10.0, E=8: 10.0, E=32: 10.0" in flat.evidence
    assert linear.holds and "E=32: 161.0" in linear.evidence
    assert not speed.holds and "slowest 70 % of fastest" in speed.evidence
    assert accuracy.holds  # 0.5 points apart
    for run in tmp_path.glob("s32-*"):  # the sparse E=32 mixture still learning
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "test/acc": 0.30}))
    *_, undecided = compute_scaling(results_of(tmp_path))
    assert undecided.holds is None and undecided.label == "not checked"
    assert "under-trained: the lowest is 0.3000, under the 0.90" in undecided.evidence


MODULAR = {  # arm → (old colours' accuracy, yellow's accuracy, fit s, old experts unchanged)
    "base": (0.99, 0.00, 50.0, None),
    "add_expert": (0.985, 0.97, 20.0, 3),
    "add_expert_new_only": (0.70, 0.99, 12.0, 3),
    "fine_tune": (0.99, 0.98, 21.0, 0),
    "fine_tune_new_only": (0.40, 0.99, 12.0, 0),
    "scratch": (0.99, 0.99, 55.0, None),
}


def test_modular_experts_reads_old_and_new_accuracy_bit_identity_and_cost(tmp_path):
    from moe_exp.analysis.questions import modular_experts

    for arm, (old, new, wall, same) in MODULAR.items():
        for seed in (0, 1):
            metrics = {f"test/acc_colour_{c}": old for c in ("red", "green", "blue")}
            metrics |= {"test/acc_colour_yellow": new, "fit_time_s": wall + seed}
            if same is not None:
                metrics |= {"surgery/old_experts": 3, "surgery/old_experts_unchanged": same}
            write_run(tmp_path, f"{arm}-{seed}", [f"task_name={arm}", f"seed={seed}"], **metrics)
    identical, keeps, learns, cheaper, forgets, protects = modular_experts(results_of(tmp_path))
    assert identical.holds and "add_expert: 3 of 3 unchanged" in identical.evidence
    assert keeps.holds and "add_expert: red, green, blue 0.9850, yellow 0.9700, trained 20 s" in (
        keeps.evidence
    )
    assert learns.holds and "add_expert 0.9700, scratch 0.9900" in learns.evidence
    assert cheaper.holds and "trained add_expert 20 s, scratch 56 s (37 %)" in cheaper.evidence
    assert forgets.holds and not protects.holds
    for run in tmp_path.glob("scratch-*"):
        (run / "summary.json").unlink()
    (unchecked,) = modular_experts(results_of(tmp_path))
    assert unchecked.holds is None and "needs scratch" in unchecked.evidence


@pytest.mark.slow
def test_modular_experts_runs_its_phases_and_decides_every_claim(tmp_path):
    """The base sweep, then the five arms from its checkpoints, reduced; every claim checked."""
    from moe_exp.analysis.reproduce import reproduce

    tiny = [*TINY_DATA, "trainer.max_epochs=1", "seed=0"]
    folder = reproduce("modular_experts", tmp_path, tiny, jobs=1)
    runs = find_runs([folder])
    assert len(runs) == 6 and all(r.status == "completed" for r in runs), [r.status for r in runs]
    verdicts = json.loads((folder / "verdicts.json").read_text())
    assert len(verdicts) == 6 and all(v["verdict"] != "not checked" for v in verdicts)
    added = [r for r in runs if r.params.get("task_name") == "add_expert"]
    assert added[0].summary["surgery/old_experts_unchanged"] == 3


def test_an_ablation_may_name_the_parameter_columns_its_table_shows(tmp_path):
    """Arms whose surgery, data and epochs change together: the table shows the arm only,
    report.csv every swept key."""
    spec = {"title": "Arms", "parameters": ["task_name"], "metrics": ["test/acc"]}
    for arm, epochs in (("base", 5), ("grown", 2)):
        overrides = [f"task_name={arm}", f"trainer.max_epochs={epochs}", "seed=0"]
        write_run(tmp_path / "runs", arm, overrides, "completed", spec, **{"test/acc": 0.9})
    table = build_report([tmp_path / "runs"], tmp_path / "out")
    assert table["header"] == ["task_name", "test/acc", "n", "status"]
    assert [row[0] for row in table["rows"]] == ["base", "grown"]
    assert (tmp_path / "out" / "report.csv").read_text().startswith("task_name,trainer.max_epochs")
    assert [p.name for p in table["plots"]] == ["test_acc_vs_task_name.png"]
