"""Self-checking reproductions: each ``experiment=ablation_*`` preset names one of the
functions below (``ablation.check``); ``moe-exp-report`` calls it on the sweep's runs and
writes whether each published finding **holds** or **does not hold**, with the numbers.

A check never tunes anything: it reads the means over seeds of the completed runs and
compares them with the paper's expectation (or the preset's own bar). A claim whose runs are
missing (failed, diverged, not run) is reported as *not checked*, never as holding; the report
reruns each check on seed redraws (:func:`moe_exp.analysis.verdicts.assess`) and calls a claim
that seed noise could flip *inconclusive*.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from moe_exp.analysis.verdicts import Results, Verdict
from moe_exp.analysis.verdicts import verdict as _verdict


def _pairs(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.strip("[]").split(","))


def balance_loss(results: Results, key: str = "balance_weights") -> list[Verdict]:
    """Shazeer et al. 2017, appendix A (Table 6): the importance and load losses balance
    noisy top-k routing; without them the load collapses onto a few experts."""
    weights = results.values(key)
    off = [w for w in weights if max(_pairs(w)) == 0]
    on = [w for w in weights if max(_pairs(w)) >= 0.1]
    nonzero = [w for w in weights if max(_pairs(w)) > 0]
    verdicts = []
    for w in off:
        cv, mm = (results.mean(m, **{key: w}) for m in ("test/cv_load", "test/max_mean_load"))
        verdicts.append(
            _verdict(
                "without a balance loss the load is far from balanced (CV(load) > 1 or "
                "max/mean load > 3)",
                [cv, mm],
                lambda cv=cv, mm=mm: cv > 1 or mm > 3,
                f"weights {w}: CV(load) {cv:.2f}, max/mean {mm:.2f} (paper: 3.01, 17.80)",
            )
        )
    for split, when in (("test", "at test (no noise)"), ("train", "while training (noisy)")):
        cvs = {w: results.mean(f"{split}/cv_load", **{key: w}) for w in on}
        verdicts.append(
            _verdict(
                f"any weight >= 0.1 balances the load {when}: CV(load) < 0.5",
                cvs.values(),
                lambda cvs=cvs: all(v < 0.5 for v in cvs.values()),
                ", ".join(f"{w}: {v:.3f}" for w, v in cvs.items()) + " (paper 0.1/0.1: 0.05)",
            )
        )
    accs = {w: results.mean("test/acc", **{key: w}) for w in nonzero}
    spread = max(accs.values()) - min(accs.values()) if accs else math.nan
    verdicts.append(
        _verdict(
            "accuracy is within 2 points across the non-zero weights",
            [spread],
            lambda: spread <= 0.02,
            f"test/acc from {min(accs.values()):.4f} to {max(accs.values()):.4f}"
            f" (spread {100 * spread:.2f} points)"
            if accs
            else "no runs",
        )
    )
    return verdicts


_MV = ("test/max_vio", "train/max_vio", "test/acc")


def bias_balance(results: Results, rate: str = "gate.bias_update_rate") -> list[Verdict]:
    """Wang et al. 2024 ("Auxiliary-loss-free load balancing"): bias-adjusted top-k keeps
    MaxVio lower than the switch aux loss (0.04 vs 0.72) at equal quality. Checked for the
    paper's γ and for every other γ the sweep ran (``gate.bias_update_rate``)."""
    key = rate.replace(".", "__")
    aux = {m: results.mean(m, gate="topk", regularizer="switch") for m in _MV}
    none = {m: results.mean(m, gate="topk", regularizer="none") for m in _MV}
    verdicts = []
    for gamma in results.values(rate) or ["default"]:
        name = "γ = 0.001 (paper)" if gamma == "default" else f"γ = {gamma}"
        where = {"gate": "bias_balanced", "regularizer": "none", key: gamma}
        bias = {m: results.mean(m, **where) for m in _MV}
        gap = abs(bias["test/acc"] - aux["test/acc"])
        verdicts += [
            _verdict(
                f"{name}: at test, MaxVio(loss-free bias) < MaxVio(switch aux loss)",
                [bias["test/max_vio"], aux["test/max_vio"]],
                lambda b=bias: b["test/max_vio"] < aux["test/max_vio"],
                f"test MaxVio bias {bias['test/max_vio']:.3f}, aux {aux['test/max_vio']:.3f}, "
                f"neither {none['test/max_vio']:.3f} (paper: 0.04 vs 0.72)",
            ),
            _verdict(
                f"{name}: while training (the last epoch's batches), MaxVio(loss-free bias) < "
                "MaxVio(switch aux loss)",
                [bias["train/max_vio"], aux["train/max_vio"]],
                lambda b=bias: b["train/max_vio"] < aux["train/max_vio"],
                f"train MaxVio bias {bias['train/max_vio']:.3f}, aux "
                f"{aux['train/max_vio']:.3f} (the bias is still moving then; at test it is "
                "frozen)",
            ),
            _verdict(
                f"{name}: the accuracy of the two is within 1 point",
                [gap],
                lambda g=gap: g <= 0.01,
                f"test/acc bias {bias['test/acc']:.4f}, aux {aux['test/acc']:.4f}, "
                f"neither {none['test/acc']:.4f}",
            ),
        ]
    return verdicts


def clusters(results: Results, single: str = "1", moe: str = "4") -> list[Verdict]:
    """Chen et al. 2022 ("Towards understanding the mixture-of-experts layer"): an MoE beats
    a single model only where the data has cluster structure, and needs non-linear experts."""
    kinds = results.values("data.clusters")
    plain = "[]" if "[]" in kinds else None
    clustered = next((v for v in kinds if v != "[]"), None)
    if plain is None or clustered is None:
        return [Verdict("MoE gains only on clustered data", None, "needs plain and clustered runs")]

    def gain(data: str, expert: str) -> float:
        acc = {
            e: results.mean("test/acc", experts=e, data__clusters=data, expert=expert)
            for e in (single, moe)
        }
        return acc[moe] - acc[single]

    g = {(d, e): gain(d, e) for d in (plain, clustered) for e in ("cnn", "linear")}
    text = ", ".join(
        f"{e} on {'clustered' if d == clustered else 'plain'} {100 * v:+.2f}"
        for (d, e), v in g.items()
    )
    c = clustered
    return [
        _verdict(
            "with CNN experts the MoE's gain over a single model is positive on clustered "
            "data and larger there than on plain data",
            [g[plain, "cnn"], g[c, "cnn"]],
            lambda: g[c, "cnn"] > max(g[plain, "cnn"], 0.0),
            f"MoE − single, test/acc points: {text} (paper, CIFAR-10: plain −0.37, rotated +2.82)",
        ),
        _verdict(
            "non-linear experts matter: on clustered data the CNN mixture gains more over its "
            "single model than the linear mixture does",
            [g[c, "cnn"], g[c, "linear"]],
            lambda: g[c, "cnn"] > g[c, "linear"],
            f"gain cnn {100 * g[c, 'cnn']:+.2f} vs linear {100 * g[c, 'linear']:+.2f} points",
        ),
    ]


def specialisation(
    results: Results, attributes: Sequence[str] = ("shape", "colour"), bar: float = 0.5
) -> list[Verdict]:
    """The shapes & colours example: do experts come to specialise by one attribute?"""
    nmi = {
        (s, a): results.mean(f"test/nmi_{a}", strategy=s)
        for s in results.values("strategy")
        for a in attributes
    }
    best = max(
        nmi.items(),
        key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1],
        default=(("-", "-"), math.nan),
    )
    text = "; ".join(
        f"{s}: " + ", ".join(f"NMI({a}) {nmi[s, a]:.3f}" for a in attributes)
        for s in results.values("strategy")
    )
    return [
        _verdict(
            f"at least one strategy reaches NMI >= {bar} between the chosen expert and one "
            "attribute",
            [best[1]],
            lambda: best[1] >= bar,
            f"best: {best[0][0]} by {best[0][1]} ({best[1]:.3f}); {text}",
        )
    ]


def strategies(results: Results, bar: float = 0.9) -> list[Verdict]:
    """A bar for the strategy axis: every strategy trains to ``bar`` test accuracy."""
    rows = {
        (s, d): (
            results.mean("test/acc", strategy=s, data=d),
            results.mean("wall_time_s", strategy=s, data=d),
        )
        for s in results.values("strategy")
        for d in results.values("data") or ["default"]
    }
    text = "; ".join(f"{s} on {d}: {a:.4f} in {t:.0f} s" for (s, d), (a, t) in rows.items())
    return [
        _verdict(
            f"every strategy reaches test/acc >= {bar} on every dataset",
            [a for a, _ in rows.values()],
            lambda: all(a >= bar for a, _ in rows.values()),
            text,
        )
    ]


def overfitting(results: Results, gap: str = "gap/acc_eval") -> list[Verdict]:
    """Overfitting of sparse mixtures (Fedus et al. 2021 found expert dropout 0.4 helps at
    fine-tuning): on a small training set, do mixtures overfit more than one expert, does
    the gap keep growing with the number of experts, and does expert dropout shrink it?
    The gap is train − val accuracy, both in eval mode at the best checkpoint (dropout
    off); the dense baselines (``model=dense_*``, their own sweep) are quoted beside."""
    fractions = results.values("data.train_fraction")
    drops = results.values("expert.dropout")
    if not fractions or len(drops) < 2:
        return [Verdict("the gap grows with experts", None, "needs train_fraction and dropout")]
    small, lo, hi = fractions[0], drops[0], drops[-1]
    mixture = {"model": "default", "data__train_fraction": small}
    by_e = {
        e: results.mean(gap, experts=e, expert__dropout=lo, **mixture)
        for e in results.values("experts")
    }
    by_e = {e: v for e, v in by_e.items() if not math.isnan(v)}
    single = by_e.get("1", math.nan)
    many = [v for e, v in by_e.items() if e != "1"]
    rho = _spearman([float(e) for e in by_e], list(by_e.values())) if len(by_e) > 1 else math.nan
    dense = {
        m: results.mean(gap, model=m, data__train_fraction=small, expert__dropout=lo)
        for m in results.values("model")
        if m != "default"
    }
    by_drop = {d: results.mean(gap, expert__dropout=d, **mixture) for d in (lo, hi)}
    val = {d: results.mean("val/acc", expert__dropout=d, **mixture) for d in (lo, hi)}
    table = (
        ", ".join(f"E={e}: {100 * v:.2f}" for e, v in by_e.items())
        + " points"
        + "".join(f"; {m}: {100 * v:.2f}" for m, v in dense.items())
    )
    return [
        _verdict(
            f"on the small training set (train_fraction {small}) every mixture (E >= 2) "
            "overfits more than one expert (E = 1)",
            [single, *many],
            lambda: bool(many) and min(many) > single,
            table,
        ),
        _verdict(
            "the gap keeps growing with the number of experts (Spearman ρ >= 0.5 over E)",
            [rho],
            lambda: rho >= 0.5,
            f"ρ = {rho:+.2f}",
        ),
        _verdict(
            f"expert dropout {hi} shrinks the small-set gap (mean over E, vs {lo})",
            by_drop.values(),
            lambda: by_drop[hi] < by_drop[lo],
            ", ".join(f"dropout {d}: {100 * v:.2f}" for d, v in by_drop.items()) + " points",
        ),
        _verdict(
            f"expert dropout {hi} improves the small-set validation accuracy (it regularises, "
            "rather than shrinking the gap by underfitting)",
            val.values(),
            lambda: val[hi] > val[lo],
            ", ".join(f"dropout {d}: val/acc {v:.4f}" for d, v in val.items()),
        ),
    ]


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); 0 when either is constant."""

    def ranks(v: Sequence[float]) -> list[float]:
        return [sum(w < x for w in v) + (sum(w == x for w in v) - 1) / 2 for x in v]

    rx, ry = ranks(xs), ranks(ys)
    if statistics.pstdev(rx) == 0 or statistics.pstdev(ry) == 0:
        return 0.0
    return statistics.correlation(rx, ry)
