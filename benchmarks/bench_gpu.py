"""The GPU check, prepared for the day a CUDA machine is lent: one script, about 8 minutes.

1. The default run (``moe-exp``) on the CPU in fp32 (the reference), then on the device in
   fp32 and in bf16-mixed: wall time, test accuracy and per-expert test loads.
2. The MoE layer against a dense MLP of the same active FLOPs on the device (top-k gate, MLP
   experts, d=256, h=512, 4,096 tokens, forward + backward, E in {8, 64}, k in {1, 2}), and
   the layer's output on the device against the CPU's for the same weights.
3. A 2-job sweep (``-m seed=0,1``) on the device: both jobs complete.

Each result is checked against a stated tolerance (:data:`TOLERANCES`): training on another
device, or in bf16, takes other rounding and so another path, so accuracy is held to a few
points and the load spread to the balance a run of its own would give, while the layer's
output, one forward pass, must agree to float32 rounding. Prints a table, writes
outputs/benchmarks/gpu.json, and exits 1 if a check fails.

    python benchmarks/bench_gpu.py                         # on a machine with CUDA
    python benchmarks/bench_gpu.py --device cpu --quick    # the CPU path, in seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "moe-exp")
TOLERANCES = {
    "acc_fp32_points": 1.0,  # |test/acc(device fp32) - test/acc(CPU)|, in points
    "acc_bf16_points": 2.0,  # the same for bf16-mixed
    "min_load_share": 0.5,  # every expert's test load >= this share of the uniform 1/E
    "layer_output_rtol": 1e-3,  # one forward pass, float32, relative to the output's scale
}
QUICK_RUN = [
    "experiment=quick",
    "data.n_train=256",
    "data.n_val=128",
    "data.n_test=128",
    "threads=1",
    "plots=false",
]
LAYER = {"d": 256, "hidden": 512, "tokens": 4096, "experts": [8, 64], "ks": [1, 2]}
QUICK_LAYER = {"d": 32, "hidden": 64, "tokens": 256, "experts": [8, 64], "ks": [1, 2]}

# A runner takes moe-exp's arguments and a working folder and returns the exit status.
Runner = Callable[[Sequence[str], Path], int]


def subprocess_runner(args: Sequence[str], cwd: Path) -> int:
    out = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
    return out.returncode


def device_overrides(device: str, precision: str) -> list[str]:
    accelerator = "gpu" if device == "cuda" else "cpu"
    return [f"trainer.accelerator={accelerator}", f"trainer.precision={precision}"]


def one_run(run: Runner, args: Sequence[str]) -> dict:
    """Wall time, test accuracy and test loads of one ``moe-exp`` run in a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        code = run(list(args), Path(tmp))
        wall = time.perf_counter() - start
        summaries = list(Path(tmp).glob("outputs/runs/*/*/summary.json"))
        data = json.loads(summaries[0].read_text()) if summaries else {}
    loads = [v for k, v in sorted(data.items()) if re.fullmatch(r"test/load_e\d+", k)]
    return {
        "exit": code,
        "status": data.get("status", "missing"),
        "wall_s": round(wall, 2),
        "test_acc": data.get("test/acc"),
        "test_loads": loads,
    }


def default_runs(run: Runner, device: str, base: Sequence[str]) -> dict[str, dict]:
    variants = {
        "cpu fp32": device_overrides("cpu", "32-true"),
        f"{device} fp32": device_overrides(device, "32-true"),
        f"{device} bf16-mixed": device_overrides(device, "bf16-mixed"),
    }
    results = {}
    for name, overrides in variants.items():
        results[name] = one_run(run, [*base, *overrides])
        r = results[name]
        print(f"  {name:<18} {r['status']:<10} {r['wall_s']:>7.1f} s  test/acc {r['test_acc']}")
    return results


def sweep(run: Runner, device: str, base: Sequence[str]) -> dict:
    """A 2-job sweep on the device: how many of its jobs completed."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        args = ["-m", *base, *device_overrides(device, "32-true"), "seed=0,1"]
        code = run(args, Path(tmp))
        wall = time.perf_counter() - start
        records = [
            json.loads(p.read_text())
            for p in Path(tmp).glob("outputs/multiruns/*/*/*/summary.json")
        ]
    completed = sum(r.get("status") == "completed" for r in records)
    print(f"  sweep of 2 jobs: {completed} completed in {wall:.1f} s")
    return {"exit": code, "jobs": len(records), "completed": completed, "wall_s": round(wall, 2)}


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward + backward, gradients dropped first."""
    x.grad = None
    module.zero_grad(set_to_none=True)
    out = module(x)
    (out[0] if isinstance(out, tuple) else out).backward(grad)


def layer(device: str, cfg: dict, repeats: int, warmup: int) -> list[dict]:
    """MoE vs dense of the same active FLOPs on the device, and the MoE's output there
    against the CPU's for the same weights and inputs."""
    from torch import nn

    from moe_exp.moe.experts.bank import MLPExpertBank
    from moe_exp.moe.gates import TopKGate
    from moe_exp.moe.layer import MoE

    d, hidden, n = cfg["d"], cfg["hidden"], cfg["tokens"]
    rows = []
    for k in cfg["ks"]:
        for e in cfg["experts"]:
            torch.manual_seed(0)
            with warnings.catch_warnings():  # k=1 top-k trains no router; none trains here
                warnings.simplefilter("ignore")
                gate = TopKGate(d, e, k=k)
            moe = MoE(gate, MLPExpertBank(e, d, hidden, d, activation="gelu"))
            dense = nn.Sequential(nn.Linear(d, k * hidden), nn.GELU(), nn.Linear(k * hidden, d))
            x_cpu = torch.randn(n, d)
            with torch.no_grad():
                reference = moe(x_cpu)[0]
            moe, dense = moe.to(device), dense.to(device)
            x = x_cpu.to(device).requires_grad_()
            grad = torch.randn(n, d, device=device)
            with torch.no_grad():
                on_device = moe(x)[0].cpu()
            error = ((on_device - reference).abs().max() / reference.abs().max()).item()
            moe_s = statistics.median(timed(partial(step, moe, x, grad), device, repeats, warmup))
            dense_s = statistics.median(
                timed(partial(step, dense, x, grad), device, repeats, warmup)
            )
            rows.append(
                {
                    "experts": e,
                    "k": k,
                    "moe_ms": round(1e3 * moe_s, 3),
                    "dense_ms": round(1e3 * dense_s, 3),
                    "ratio": round(moe_s / dense_s, 3),
                    "output_rel_error_vs_cpu": error,
                }
            )
            r = rows[-1]
            print(
                f"  E={e:<3} k={k}  moe {r['moe_ms']:8.3f} ms  dense {r['dense_ms']:8.3f} ms  "
                f"ratio {r['ratio']:.2f}  |out - cpu|/|cpu| {error:.1e}"
            )
    return rows


def checks(result: dict, device: str) -> dict[str, bool]:
    runs, reference = result["default_runs"], result["default_runs"]["cpu fp32"]
    found = {}
    for name, r in runs.items():
        found[f"{name}: completed"] = r["exit"] == 0 and r["status"] == "completed"
    for precision, key in (("fp32", "acc_fp32_points"), ("bf16-mixed", "acc_bf16_points")):
        r = runs[f"{device} {precision}"]
        if r["test_acc"] is not None and reference["test_acc"] is not None:
            gap = 100 * abs(r["test_acc"] - reference["test_acc"])
            found[f"{device} {precision}: test/acc within {TOLERANCES[key]} points of the CPU"] = (
                gap <= TOLERANCES[key]
            )
    for name, r in runs.items():
        if r["test_loads"]:
            floor = TOLERANCES["min_load_share"] / len(r["test_loads"])
            found[f"{name}: every expert's test load >= {floor:.3f}"] = (
                min(r["test_loads"]) >= floor
            )
    found["sweep: both jobs completed"] = result["sweep"]["completed"] == 2
    worst = max(row["output_rel_error_vs_cpu"] for row in result["layer"])
    found[f"layer output matches the CPU's (rel. error {worst:.1e})"] = (
        worst <= TOLERANCES["layer_output_rtol"]
    )
    return found


def main(argv: Sequence[str] | None = None, run: Runner = subprocess_runner) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny runs and layer: seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run with --device cpu for the CPU path")
        return 2
    base = QUICK_RUN if args.quick else []
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    result: dict = {"device": args.device, "name": name, "torch": torch.__version__}
    result["tolerances"] = TOLERANCES
    print(f"default run ({'quick' if args.quick else 'as a user runs it'}):")
    result["default_runs"] = default_runs(run, args.device, base)
    print("MoE layer vs dense of the same active FLOPs (forward + backward):")
    cfg, repeats = (QUICK_LAYER, 2) if args.quick else (LAYER, 20)
    result["layer"] = layer(args.device, cfg, repeats, warmup=1 if args.quick else 5)
    print("sweep:")
    result["sweep"] = sweep(run, args.device, base)
    result["checks"] = checks(result, args.device)
    for claim, ok in result["checks"].items():
        print(f"  {'ok    ' if ok else 'FAILED'} {claim}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
