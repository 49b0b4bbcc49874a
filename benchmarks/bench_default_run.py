"""Benchmark the default experiment end to end, and Lightning's loop against a bare loop.

Prints a table and writes outputs/benchmarks/default_run.json. Two parts:
1. `moe-exp` with no overrides, as a user runs it (start-up included): wall time, test
   accuracy, per-expert test load, repeated --repeats times.
2. Training throughput (samples/s) of the default model and data: Lightning's fit loop
   vs a bare PyTorch loop doing the same steps, interleaved (the first of the two
   alternating), the median of --rounds paired ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import joint_step, write_result

CLI = str(Path(sys.executable).parent / "moe-exp")


def default_run(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = subprocess.run([CLI, *overrides], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"moe-exp failed:\n{out.stderr[-3000:]}")
        (summary,) = Path(tmp).glob("outputs/runs/*/*/summary.json")
        data = json.loads(summary.read_text())
    experts = sum(1 for k in data if re.fullmatch(r"test/load_e\d+", k))
    loads = [data[f"test/load_e{i}"] for i in range(experts)]
    return {
        "wall_s": wall,
        "test_acc": data["test/acc"],
        "test_loads": loads,
        "min_load": min(loads),
        "run_wall_s": data["wall_time_s"],
    }


def _build(seed: int = 0):
    """The default config, its datamodule and module, seeded (the same for both loops)."""
    import lightning as L

    from moe_exp.app.build import build_components
    from moe_exp.app.compose import compose
    from moe_exp.app.run import quiet_lightning

    quiet_lightning()
    cfg = compose()
    torch.set_num_threads(cfg.threads)
    L.seed_everything(seed, verbose=False)
    return (cfg, *build_components(cfg))


def lightning_rate(epochs: int = 1) -> float:
    """Samples/s of Lightning's fit loop on the default model and data."""
    import lightning as L

    from moe_exp.training.callbacks import LineProgressBar

    _, datamodule, module = _build()
    n = len(datamodule.splits["train"]) * epochs
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[LineProgressBar(marks=1)],
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return n / (time.perf_counter() - start)


def bare_rate(epochs: int = 1) -> float:
    """Samples/s of a bare PyTorch loop doing the same steps (same optimiser and schedule)."""
    from moe_exp.training.optim import adamw

    cfg, datamodule, module = _build()
    n = len(datamodule.splits["train"]) * epochs
    model = module.model.train()
    optimizer = adamw(
        [
            {
                "params": list(model.parameters()),
                "lr": cfg.optim.lr,
                "weight_decay": cfg.optim.weight_decay,
            }
        ]
    )
    loader = datamodule.train_dataloader()
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, cfg.optim.lr, total_steps=len(loader) * epochs
    )
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y, _ in loader:
            joint_step(model, optimizer, x, y)
            schedule.step()
    return n / (time.perf_counter() - start)


def throughput(rounds: int) -> dict:
    """Both loops once per round, the one that goes first alternating (so neither always
    gets the warmer or the cooler machine); the ratio is the median of the rounds' own
    Lightning / bare ratios, since the machine's speed drifts between rounds."""
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            pairs.append((lightning_rate(), bare_rate()))
        else:
            bare = bare_rate()
            pairs.append((lightning_rate(), bare))
    return {
        "lightning_samples_s": statistics.median(p[0] for p in pairs),
        "bare_samples_s": statistics.median(p[1] for p in pairs),
        "ratio": statistics.median(p[0] / p[1] for p in pairs),
        "round_ratios": [p[0] / p[1] for p in pairs],
        "rounds": pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="default runs end to end")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved throughput rounds")
    parser.add_argument("--skip-run", action="store_true", help="only measure throughput")
    args = parser.parse_args()

    result: dict = {}
    if not args.skip_run:
        runs = [default_run([]) for _ in range(args.repeats)]
        result["default_runs"] = runs
        print(f"{'default run':<14}{'wall s':>8}{'test acc':>10}{'min load':>10}  loads")
        for r in runs:
            print(
                f"{'':<14}{r['wall_s']:>8.1f}{r['test_acc']:>10.4f}{r['min_load']:>10.3f}  "
                + " ".join(f"{v:.3f}" for v in r["test_loads"])
            )
    result["throughput"] = rates = throughput(args.rounds)
    print(
        f"train throughput: Lightning {rates['lightning_samples_s']:.0f}/s, bare loop "
        f"{rates['bare_samples_s']:.0f}/s (medians); Lightning / bare {rates['ratio']:.3f} "
        f"(median of {args.rounds} paired rounds: "
        + " ".join(f"{r:.3f}" for r in rates["round_ratios"])
        + ")"
    )
    write_result("default_run", result)


if __name__ == "__main__":
    main()
