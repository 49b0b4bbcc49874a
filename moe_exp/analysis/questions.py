"""Questions of this project's own, checked like the reproductions in
:mod:`moe_exp.analysis.ablations` (a preset's ``ablation.check`` names one): what the gate
routes on, and how compute scales with the number of experts.
"""

from __future__ import annotations

import math

from moe_exp.analysis.verdicts import Results, Verdict
from moe_exp.analysis.verdicts import verdict as _verdict


def gate_features(
    results: Results, target: str = "data.target", view: str = "model.gate_input"
) -> list[Verdict]:
    """What does the gate route on? On shapes the colour is the most salient feature: a gate
    that sees the whole image is expected to route by colour whatever the label asks for,
    unless colour is taken from it (a greyscale copy), when it must route by what is left.
    The experts always see the whole image, so accuracy should not depend on the view."""
    # a key the sweep held fixed reads as "default", as in the report's table
    targets, views = results.values(target) or ["default"], results.values(view) or ["default"]
    if len(views) < 2:
        return [Verdict("what the gate routes on", None, f"needs {view} swept over 2+ views")]
    tkey, vkey = target.replace(".", "__"), view.replace(".", "__")
    nmi = {
        (t, v, a): results.mean(f"test/nmi_{a}", **{tkey: t, vkey: v})
        for t in targets
        for v in views
        for a in ("shape", "colour")
    }
    acc = {(t, v): results.mean("test/acc", **{tkey: t, vkey: v}) for t in targets for v in views}

    def by(v: str) -> str:
        return "; ".join(
            f"target {t}: NMI(shape) {nmi[t, v, 'shape']:.2f}, "
            f"NMI(colour) {nmi[t, v, 'colour']:.2f}"
            for t in targets
        )

    verdicts = []
    for v, attribute, other in (("image", "colour", "shape"), ("grey", "shape", "colour")):
        if v not in views:
            continue
        wanted = [nmi[t, v, attribute] - nmi[t, v, other] for t in targets]
        seeing = "the whole image" if v == "image" else "a greyscale copy"
        verdicts.append(
            _verdict(
                f"a gate that sees {seeing} routes by {attribute} whatever the target: "
                f"NMI({attribute}) > NMI({other}) for every target",
                wanted,
                lambda wanted=wanted: min(wanted) > 0,
                by(v),
            )
        )
    if "image" in views:
        drops = {(t, v): acc[t, "image"] - a for (t, v), a in acc.items() if v != "image"}
        worst = max(drops.items(), key=lambda kv: kv[1])
        verdicts.append(
            _verdict(
                "what the gate sees costs at most 1 point of test accuracy (the experts see "
                "the whole image)",
                [*drops.values(), *acc.values()],
                lambda: worst[1] <= 0.01,
                ", ".join(f"{t}/{v}: {a:.4f}" for (t, v), a in acc.items())
                + f" (largest drop: {worst[0][0]} with {worst[0][1]}, {100 * worst[1]:.2f} points)",
            )
        )
    return verdicts


def compute_scaling(
    results: Results, sparse: str = "noisy_topk", dense: str = "softmax", spread: float = 0.2
) -> list[Verdict]:
    """The efficiency claim of sparse gating (Shazeer et al. 2017): a top-k gate runs k
    experts per input, so active compute stays flat as experts are added while a dense-all
    gate's grows linearly, and training throughput stays within ``spread`` across E."""
    sizes = results.values("experts")
    if len(sizes) < 2 or not {sparse, dense} <= set(results.values("gate")):
        return [
            Verdict(
                "compute scales with k, not E",
                None,
                f"needs experts and gate={sparse},{dense} swept",
            )
        ]
    mixture = {"model": "default"}

    def per_e(metric: str, gate: str) -> dict[str, float]:
        return {e: results.mean(metric, experts=e, gate=gate, **mixture) for e in sizes}

    flops = {g: per_e("flops_active", g) for g in (sparse, dense)}
    speed = per_e("train_samples_per_s", sparse)
    acc = {g: per_e("test/acc", g) for g in (sparse, dense)}
    baseline = {e: results.mean("test/acc", experts=e, model="dense_flops") for e in sizes}
    lo, hi = sizes[0], sizes[-1]

    def row(values: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
        return ", ".join(f"E={e}: {v / scale:.{digits}f}" for e, v in values.items())

    # at least two sizes were swept (checked above)
    sparse_growth = max(flops[sparse].values()) / min(flops[sparse].values())
    dense_per_expert = [flops[dense][e] / float(e) for e in sizes]
    slowest = min(speed.values()) / max(speed.values())
    gaps = {e: acc[dense][e] - acc[sparse][e] for e in sizes}
    return [
        _verdict(
            f"{sparse}: active FLOPs per input stay flat in E (largest within 10 % of smallest)",
            flops[sparse].values(),
            lambda: sparse_growth <= 1.10,
            f"MFLOPs {row(flops[sparse], 1e6)} (×{sparse_growth:.2f} from E={lo} to E={hi})",
        ),
        _verdict(
            f"{dense} (every expert on every input): active FLOPs grow linearly in E (FLOPs "
            "per expert within 25 % across E)",
            flops[dense].values(),
            lambda: max(dense_per_expert) <= 1.25 * min(dense_per_expert),
            f"MFLOPs {row(flops[dense], 1e6)}",
        ),
        _verdict(
            f"{sparse}: training samples/s stay within {100 * spread:.0f} % across E",
            speed.values(),
            lambda: slowest >= 1 - spread,
            f"samples/s {row(speed, digits=0)} (slowest {100 * slowest:.0f} % of fastest)",
        ),
        _verdict(
            f"{sparse} is within 1 point of {dense}'s test accuracy at every E",
            gaps.values(),
            lambda: max(gaps.values()) <= 0.01,
            f"test/acc {sparse} {row(acc[sparse], digits=4)}; {dense} {row(acc[dense], digits=4)}"
            + (
                f"; dense baseline of equal active FLOPs {row(baseline, digits=4)}"
                if not all(math.isnan(v) for v in baseline.values())
                else ""
            ),
        ),
    ]
