"""Benchmark the default experiment end to end, and Lightning's loop against a bare loop.

Prints a table and writes outputs/benchmarks/default_run.json. Two parts:
1. `moe-exp` with no overrides, as a user runs it (start-up included): wall time, test
   accuracy, per-expert test load, repeated --repeats times.
2. Training throughput (samples/s) of the default model and data: Lightning's fit loop
   vs a bare PyTorch loop doing the same steps, interleaved, median of --rounds.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
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


def throughput(epochs: int = 1) -> tuple[float, float]:
    """Samples/s of one training epoch: (Lightning, bare loop), same model, data, optimiser."""
    import lightning as L

    from moe_exp.app.build import build_components
    from moe_exp.app.compose import compose
    from moe_exp.app.run import quiet_lightning
    from moe_exp.training.callbacks import LineProgressBar
    from moe_exp.training.optim import adamw

    quiet_lightning()
    cfg = compose()
    torch.set_num_threads(cfg.threads)

    L.seed_everything(0, verbose=False)
    datamodule, module = build_components(cfg)
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
    lightning_rate = n / (time.perf_counter() - start)

    L.seed_everything(0, verbose=False)
    datamodule, module = build_components(cfg)
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
            log_probs, routings = model(x)
            loss = F.nll_loss(log_probs, y) + sum(sum(r.aux_losses.values()) for r in routings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    bare_rate = n / (time.perf_counter() - start)
    return lightning_rate, bare_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="default runs end to end")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
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
    rates = [throughput() for _ in range(args.rounds)]
    lightning = statistics.median(r[0] for r in rates)
    bare = statistics.median(r[1] for r in rates)
    result["throughput"] = {
        "lightning_samples_s": lightning,
        "bare_samples_s": bare,
        "ratio": lightning / bare,
        "rounds": rates,
    }
    print(
        f"train throughput: Lightning {lightning:.0f}/s, bare loop {bare:.0f}/s, "
        f"ratio {lightning / bare:.3f} (median of {args.rounds})"
    )
    out = ROOT / "outputs" / "benchmarks" / "default_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
