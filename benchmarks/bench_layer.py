"""Benchmark the MoE layer against a dense MLP of equal active FLOPs.

MoE: top-k gate + ``MLPExpertBank`` (d → hidden → d, GELU), N tokens, no capacity limit.
Ideal dense: one MLP d → k·hidden → d on the same N tokens (the same matmul FLOPs as k
experts per token). Forward + backward (the input requires grad, as inside a network),
the two interleaved in one process (A B A B ...), medians over repeats. The ratio
MoE/dense is what routing costs: the router matmul, top-k, the argsort, the gather into the
experts' layout, the weighting and the index_add scatter, and E smaller matmuls instead of
one big one.
``--profile`` breaks each MoE point's time down by op kind (torch.profiler, self CPU time).

Also times the matmuls alone (``matmul_floor``): the experts' six forward + backward
products on perfectly balanced blocks, one, two or four experts per ``bmm``, with their
weight gradients written to E distinct tensors, plus the router's products. ``floor`` =
(router + best grouping) / dense: what the layer cannot beat with this BLAS even if routing,
dispatch and combine cost nothing. Where the layer's ratio sits near its floor, what is left
is the BLAS on small blocks and the E-fold weight and gradient traffic, not this code.

Also measures tokens/s of every router class in ``moe_exp.moe.gates`` at E=16 (found by
introspection; a class whose constructor does not take (in_features, num_experts[, k]) is
skipped, and listed as such).

Prints tables and writes outputs/benchmarks/bench_layer.json. glibc's malloc unmaps and
remaps big freed tensors every iteration, which distorts neighbouring measurements, so the
script re-executes itself with MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_ when
they are unset (see benchmarks/timing.py).

    python benchmarks/bench_layer.py                 # full grid, torch's default threads
    python benchmarks/bench_layer.py --threads 1 --profile
    python benchmarks/bench_layer.py --quick         # seconds: a smoke test of the script
"""

from __future__ import annotations

import os

from timing import MALLOC_ENV, interleaved, steady_malloc

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler's start/stop lines
if __name__ == "__main__":
    steady_malloc()

import argparse
import json
import platform
import statistics
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from moe_exp.moe import gates
from moe_exp.moe.experts.bank import MLPExpertBank
from moe_exp.moe.gates import TopKGate
from moe_exp.moe.layer import MoE

ROOT = Path(__file__).resolve().parents[1]
FULL = {"d": 256, "hidden": 512, "tokens": 4096, "experts": [4, 8, 16, 32, 64], "ks": [1, 2]}
QUICK = {"d": 32, "hidden": 64, "tokens": 256, "experts": [4, 16], "ks": [1, 2]}
GATE_EXPERTS = 16
OP_KINDS = {  # profiler op name fragments → kind, first match wins
    "matmul": ("addmm", "mm", "bmm", "linear", "matmul"),
    "top-k / sort": ("topk", "sort", "argsort", "bincount", "repeat_interleave"),
    "gather / scatter": ("index", "gather", "scatter", "embedding"),
    "activation": ("gelu", "relu", "silu", "softmax"),
}


def dense_mlp(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def moe_layer(gate: nn.Module, d: int, hidden: int, experts: int) -> MoE:
    return MoE(gate, MLPExpertBank(experts, d, hidden, d, activation="gelu"))


def step(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    """One forward + backward; gradients are dropped first (as zero_grad(set_to_none))."""
    x.grad = None
    for p in module.parameters():
        p.grad = None
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad)


def op_breakdown(fn: callable, iterations: int = 2) -> dict[str, float]:
    """Fraction of self CPU time per op kind over a few profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            fn()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        if not event.key.startswith("aten::"):
            continue
        kind = next((k for k, frags in OP_KINDS.items() if any(f in name for f in frags)), "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {kind: totals[kind] / whole for kind in [*OP_KINDS, "other"]}


def layer_grid(cfg: dict, repeats: int, warmup: int, profile: bool) -> list[dict]:
    d, hidden, n = cfg["d"], cfg["hidden"], cfg["tokens"]
    rows = []
    torch.manual_seed(0)
    x = torch.randn(n, d, requires_grad=True)
    grad = torch.randn(n, d)
    for k in cfg["ks"]:
        for e in cfg["experts"]:
            torch.manual_seed(0)
            moe = moe_layer(TopKGate(d, e, k=k), d, hidden, e)
            dense = dense_mlp(d, k * hidden)
            times = interleaved(
                {"moe": lambda m=moe: step(m, x, grad), "dense": lambda m=dense: step(m, x, grad)},
                repeats,
                warmup,
            )
            moe_s, dense_s = statistics.median(times["moe"]), statistics.median(times["dense"])
            paired = statistics.median(
                a / b for a, b in zip(times["moe"], times["dense"], strict=True)
            )
            row = {
                "experts": e,
                "k": k,
                "moe_ms": 1e3 * moe_s,
                "dense_ms": 1e3 * dense_s,
                "ratio": moe_s / dense_s,
                "paired_ratio": paired,
                "moe_tokens_per_s": n / moe_s,
            }
            if profile:
                row["moe_time_by_op"] = op_breakdown(lambda m=moe: step(m, x, grad))
            rows.append(row)
            print(
                f"  E={e:3d} k={k}  moe {row['moe_ms']:8.2f} ms  dense {row['dense_ms']:8.2f} ms"
                f"  ratio {row['ratio']:.3f}  (paired {paired:.3f})",
                flush=True,
            )
    return rows


def six_products(x: Tensor, w1: Tensor, w2: Tensor, g1: Tensor, g2: Tensor, group: int) -> None:
    """Forward + backward matmuls of x → w1 → w2 (no bias, activation or routing): expert e
    on its equal block of x's rows, ``group`` experts per ``bmm``, the weight gradients
    written into g1[e] and g2[e] as a training step must."""
    experts = w1.shape[0]
    rows = x.shape[0] // experts
    for first in range(0, experts, group):
        last = min(first + group, experts)
        xe = x[first * rows : last * rows].view(last - first, rows, -1)
        a, b = w1[first:last], w2[first:last]
        h = torch.bmm(xe, a)
        y = torch.bmm(h, b)
        torch.bmm(h.transpose(1, 2), y, out=g2[first:last])
        torch.bmm(y, b.transpose(1, 2))
        torch.bmm(xe.transpose(1, 2), h, out=g1[first:last])
        torch.bmm(h, a.transpose(1, 2))


def router_products(x: Tensor, w: Tensor, grad_w: Tensor, grad_logits: Tensor) -> None:
    """The router's matmuls, forward + backward: logits, input gradient, weight gradient."""
    x @ w, grad_logits @ w.t()
    torch.mm(x.t(), grad_logits, out=grad_w)


def matmul_floor(cfg: dict, repeats: int, warmup: int) -> list[dict]:
    """Per (E, k): what the layer's matmuls alone cost against the dense MLP's.

    The experts get perfectly balanced blocks (the best case for any router) and run one,
    two or four per ``bmm``; the router is the d × E linear. ``floor`` = (router + the
    best grouping) / dense: the ratio the layer cannot beat with this BLAS even if top-k,
    sorting, gather, combine and padding cost nothing.
    """
    d, hidden, n = cfg["d"], cfg["hidden"], cfg["tokens"]
    groups = (1, 2, 4)
    rows = []
    for k in cfg["ks"]:
        x = torch.randn(n * k, d)
        dense = [torch.randn(1, d, k * hidden), torch.randn(1, k * hidden, d)]
        dense_grads = [torch.empty_like(w) for w in dense]
        flops = 6 * 2 * n * d * k * hidden
        for e in cfg["experts"]:
            w1, w2 = torch.randn(e, d, hidden), torch.randn(e, hidden, d)
            g1, g2 = torch.empty_like(w1), torch.empty_like(w2)
            router, router_grad = torch.randn(d, e), torch.empty(d, e)
            grad_logits = torch.randn(n, e)
            fns = {
                "dense": partial(six_products, x[:n], *dense, *dense_grads, 1),
                "router": partial(router_products, x[:n], router, router_grad, grad_logits),
                **{g: partial(six_products, x, w1, w2, g1, g2, g) for g in groups},
            }
            times = interleaved(fns, repeats, warmup)
            med = {name: statistics.median(t) for name, t in times.items()}
            best = min(groups, key=lambda g: med[g])
            row = {
                "experts": e,
                "k": k,
                "rows_per_expert": n * k // e,
                "dense_gflops": flops / med["dense"] / 1e9,
                **{f"experts_gflops_group{g}": flops / med[g] / 1e9 for g in groups},
                "router_share": med["router"] / med["dense"],
                "best_group": best,
                "floor": (med["router"] + med[best]) / med["dense"],
            }
            rows.append(row)
            per_group = "  ".join(f"{row[f'experts_gflops_group{g}']:6.1f}" for g in groups)
            print(
                f"  E={e:3d} k={k}  {row['rows_per_expert']:5d} rows/expert  dense"
                f" {row['dense_gflops']:6.1f} GF/s  experts by 1/2/4 per bmm {per_group} GF/s"
                f"  router {100 * row['router_share']:4.1f}%  floor {row['floor']:.3f}",
                flush=True,
            )
    return rows


def router_classes() -> list[type]:
    return list(gates.GATES.values())


def make_gate(cls: type, d: int, e: int, k: int) -> nn.Module:
    """Construct with (d, E, k=k), else (d, E); TypeError if neither fits."""
    try:
        return cls(d, e, k=k)
    except TypeError:
        return cls(d, e)


def gate_throughput(cfg: dict, repeats: int, warmup: int) -> list[dict]:
    """Tokens/s of forward+backward of the MoE layer with each router at E=16, k=2."""
    d, hidden, n, e, k = cfg["d"], cfg["hidden"], cfg["tokens"], GATE_EXPERTS, 2
    x = torch.randn(n, d, requires_grad=True)
    grad = torch.randn(n, d)
    layers, rows = {}, []
    for cls in router_classes():
        torch.manual_seed(0)
        try:
            layer = moe_layer(make_gate(cls, d, e, k), d, hidden, e).train()
            step(layer, x, grad)  # does it run at all?
            layers[cls.__name__] = layer
        except Exception as err:  # report every failure, keep going
            rows.append({"gate": cls.__name__, "skipped": f"{type(err).__name__}: {err}"})
    times = interleaved(
        {name: (lambda m=m: step(m, x, grad)) for name, m in layers.items()}, repeats, warmup
    )
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append({"gate": name, "ms": 1e3 * median, "tokens_per_s": n / median})
    for row in sorted(rows, key=lambda r: r["gate"]):
        if "skipped" in row:
            print(f"  {row['gate']:<18} skipped ({row['skipped'][:90]})")
        else:
            print(f"  {row['gate']:<18} {row['ms']:8.2f} ms  {row['tokens_per_s']:10.0f} tokens/s")
    return sorted(rows, key=lambda r: r["gate"])


def print_breakdown(rows: list[dict]) -> None:
    kinds = [*OP_KINDS, "other"]
    print("\nMoE time by op kind (share of self CPU time, profiled):")
    print("  E   k  " + "  ".join(f"{k:>16}" for k in kinds))
    for row in rows:
        shares = row["moe_time_by_op"]
        cells = "  ".join(f"{100 * shares[k]:15.1f}%" for k in kinds)
        print(f"  {row['experts']:<3d} {row['k']}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--profile", action="store_true", help="time by op kind per MoE point")
    parser.add_argument("--no-gates", action="store_true", help="skip the per-router throughput")
    parser.add_argument("--no-matmuls", action="store_true", help="skip the matmul floor table")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/bench_layer.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 11)
    print(
        f"MoE layer vs dense MLP of equal active FLOPs: d={cfg['d']} hidden={cfg['hidden']} "
        f"N={cfg['tokens']} threads={torch.get_num_threads()} repeats={repeats} "
        f"(MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_')})",
        flush=True,
    )
    grid = layer_grid(cfg, repeats, args.warmup, args.profile)
    if args.profile:
        print_breakdown(grid)
    matmuls = []
    if not args.no_matmuls:
        print("\nThe matmuls alone, on balanced blocks (matmul_floor):", flush=True)
        matmuls = matmul_floor(cfg, repeats, args.warmup)
    gate_rows = []
    if not args.no_gates:
        print(f"\nRouters at E={GATE_EXPERTS}, k=2 (forward+backward of the MoE layer):")
        gate_rows = gate_throughput(cfg, repeats, args.warmup)

    by = {(r["experts"], r["k"]): r["ratio"] for r in grid}
    floor = {(r["experts"], r["k"]): r["floor"] for r in matmuls}
    print("\n  E   k=1 ratio  k=2 ratio" + ("   k=1 floor  k=2 floor" if matmuls else ""))
    for e in cfg["experts"]:
        cells = "  ".join(f"{by[(e, k)]:9.3f}" if (e, k) in by else " " * 9 for k in (1, 2))
        if matmuls:
            cells += "   " + "  ".join(f"{floor.get((e, k), float('nan')):9.3f}" for k in (1, 2))
        print(f"  {e:<3d} {cells}")
    print(f"  worst ratio {max(by.values()):.3f} (goal <= 1.15)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {**cfg, "repeats": repeats, "warmup": args.warmup, "quick": args.quick},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "layer": grid,
        "matmul_floor": matmuls,
        "gates": gate_rows,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
