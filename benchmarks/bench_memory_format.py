"""Training step time of a mixture in channels-last against contiguous (NCHW) memory format.

Channels-last helps convolutions where the backend has kernels tuned for it (GPUs with
tensor cores, some CPUs); for the small convolutions of these experts on a CPU it can cost
instead. This times whole training steps (forward, backward, fused AdamW) of the built
model on one fixed batch, the two formats alternating within each round, for the default
run and for ablation_balance's 16 experts, at 1 and 2 threads. Prints a table and writes
outputs/benchmarks/memory_format.json: per case the median step time of each format and
the median of the rounds' own ratios.

    python benchmarks/bench_memory_format.py [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import joint_step, write_result

CASES = {"default run": [], "ablation_balance": ["experiment=ablation_balance"]}


def step_time(overrides: list[str], channels_last: bool, threads: int, steps: int) -> float:
    """Median seconds per training step of the configured model on one batch."""
    import lightning as L

    from moe_exp.app.build import build_components
    from moe_exp.app.compose import compose
    from moe_exp.training.optim import adamw

    cfg = compose([*overrides, f"model.channels_last={str(channels_last).lower()}"])
    torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    datamodule, module = build_components(cfg)
    model = module.model.train()
    optimizer = adamw([{"params": list(model.parameters()), "lr": 1e-3}])
    x, y, _ = next(iter(datamodule.train_dataloader()))
    times = []
    for i in range(steps + 3):  # the first steps warm the allocator and kernels up
        start = time.perf_counter()
        joint_step(model, optimizer, x, y)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from moe_exp.app.run import quiet_lightning

    quiet_lightning()
    results = {}
    print(f"{'case':<22}{'threads':>8}{'NCHW ms':>10}{'channels-last ms':>18}{'ratio':>8}")
    for name, overrides in CASES.items():
        for threads in (1, 2):
            pairs = []
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                t = {cl: step_time(overrides, cl, threads, args.steps) for cl in order}
                pairs.append((t[False], t[True]))
            row = {
                "contiguous_s": statistics.median(p[0] for p in pairs),
                "channels_last_s": statistics.median(p[1] for p in pairs),
                "ratio_channels_last_over_contiguous": statistics.median(
                    p[1] / p[0] for p in pairs
                ),
                "rounds": pairs,
            }
            results[f"{name}, {threads} thread(s)"] = row
            print(
                f"{name:<22}{threads:>8}{1e3 * row['contiguous_s']:>10.1f}"
                f"{1e3 * row['channels_last_s']:>18.1f}"
                f"{row['ratio_channels_last_over_contiguous']:>8.3f}"
            )
    write_result("memory_format", results)


if __name__ == "__main__":
    main()
