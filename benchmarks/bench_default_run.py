"""Benchmark the default experiment end to end, and Lightning's loop against a bare loop.

Prints a table and writes outputs/benchmarks/default_run.json. Two parts:
1. `moe-exp` with no overrides, as a user runs it (start-up included): wall time, test
   accuracy, per-expert test load, repeated --repeats times.
2. Training throughput (samples/s) of the default model and data: Lightning's fit loop
   vs a bare PyTorch loop doing the same steps, paired step by step (PairedSteps) over
   --rounds one-epoch fits; the ratio is the median of the pairs' ratios, and Lightning's
   fixed cost per fit (setup, epoch end, teardown) is reported beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
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


def _build(seed: int = 0, overrides: tuple[str, ...] = ()):
    """The default config (or with ``overrides``), its datamodule and module, seeded."""
    from moe_exp.app.build import build_components
    from moe_exp.app.compose import compose
    from moe_exp.app.run import quiet_lightning

    quiet_lightning()
    cfg = compose(list(overrides))
    torch.set_num_threads(cfg.threads)
    L.seed_everything(seed, verbose=False)
    return (cfg, *build_components(cfg))


class PairedSteps(L.Callback):
    """After each Lightning training step, one step of a bare PyTorch loop on a twin of the
    model (same initial weights, optimiser and schedule, its own pass over the same data),
    both timed. Pairing at the step keeps the machine's drift out of the ratio: the two steps
    of a pair run within a tenth of a second of each other. A Lightning step is the time
    between two batch starts less the bare step run in between, so it holds everything
    Lightning and the module do per batch (data fetch, hooks, the training step, metrics,
    routing statistics, progress bar, optimiser, schedule).
    """

    def __init__(self, cfg, module, datamodule) -> None:
        from moe_exp.training.optim import adamw

        self.model = copy.deepcopy(module.model).train()
        self.optimizer = adamw(
            [
                {
                    "params": list(self.model.parameters()),
                    "lr": cfg.optim.lr,
                    "weight_decay": cfg.optim.weight_decay,
                }
            ]
        )
        loader = datamodule.train_dataloader()
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, cfg.optim.lr, total_steps=len(loader)
        )
        self.batches = iter(loader)
        self.lightning: list[float] = []
        self.bare: list[float] = []
        self.sizes: list[int] = []
        self.times: dict[str, float] = {}
        self._batch_start: float | None = None
        self._bare_seconds = 0.0

    def bare_step(self) -> float:
        start = time.perf_counter()
        x, y, _ = next(self.batches)
        joint_step(self.model, self.optimizer, x, y)
        self.schedule.step()
        return time.perf_counter() - start

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_start is not None:
            self.lightning.append(now - self._batch_start - self._bare_seconds)
        else:
            self.times["first_batch"] = now
        self._batch_start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.sizes.append(int(batch[1].shape[0]))
        self._bare_seconds = self.bare_step()
        self.bare.append(self._bare_seconds)
        self.times["last_batch_end"] = time.perf_counter()


def paired_round(overrides: tuple[str, ...] = ()) -> dict:
    """One epoch of Lightning's fit on the default model and data, each step paired with a
    bare step; per-step seconds of both, and Lightning's fixed costs around the steps."""
    from moe_exp.training.callbacks import LineProgressBar

    cfg, datamodule, module = _build(overrides=overrides)
    paired = PairedSteps(cfg, module, datamodule)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[paired, LineProgressBar(marks=1)],
    )
    called = time.perf_counter()
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    returned = time.perf_counter()
    t = paired.times
    # the last step has no next batch start to end it: it is left out of the pairs
    return {
        "lightning_s": paired.lightning,
        "bare_s": paired.bare[: len(paired.lightning)],
        "batch_sizes": paired.sizes,
        "fit_start_s": t["first_batch"] - called,  # setup, hooks, first fetch
        "fit_end_s": returned - t["last_batch_end"],  # epoch-end metrics, teardown
    }


def throughput(rounds: int, overrides: tuple[str, ...] = ()) -> dict:
    """Paired steps over ``rounds`` one-epoch fits (the first step of each left out as
    warm-up). The ratio is the median of the per-step bare / Lightning ratios; the epoch
    ratio adds Lightning's fixed costs around the steps (setup before the first batch,
    epoch end and teardown after the last), as a one-epoch fit pays them."""
    lightning, bare, fixed, epoch_ratios, samples = [], [], [], [], 0
    for _ in range(rounds):
        r = paired_round(overrides)
        lightning += r["lightning_s"][1:]
        bare += r["bare_s"][1:]
        samples += sum(r["batch_sizes"][1:])
        fixed.append(r["fit_start_s"] + r["fit_end_s"])
        whole = sum(r["lightning_s"]) + r["fit_start_s"] + r["fit_end_s"]
        epoch_ratios.append(sum(r["bare_s"]) / whole)
    step_ratios = [b / light for b, light in zip(bare, lightning, strict=True)]
    return {
        "lightning_samples_s": samples / sum(lightning),
        "bare_samples_s": samples / sum(bare),
        "ratio": statistics.median(step_ratios),
        "ratio_iqr": [statistics.quantiles(step_ratios, n=4)[i] for i in (0, 2)],
        "pairs": len(step_ratios),
        "lightning_step_ms": 1e3 * statistics.median(lightning),
        "bare_step_ms": 1e3 * statistics.median(bare),
        # what Lightning and the module add to a step: the median of the pairs' differences
        "overhead_ms": 1e3 * statistics.median(a - b for a, b in zip(lightning, bare, strict=True)),
        "fixed_s_per_fit": fixed,
        "epoch_ratios": epoch_ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="default runs end to end")
    parser.add_argument("--rounds", type=int, default=3, help="one-epoch fits of paired steps")
    parser.add_argument("--skip-run", action="store_true", help="only measure throughput")
    parser.add_argument(
        "--without-metrics",
        action="store_true",
        help="switch off the module's per-step metrics and routing statistics (Lightning's "
        "own share of the overhead)",
    )
    args = parser.parse_args()
    if args.without_metrics:
        from moe_exp.training.module import MoEClassifierModule

        MoEClassifierModule.record_step = lambda *args, **kwargs: None
        MoEClassifierModule.track_routing = lambda *args, **kwargs: None
        result_name = "default_run_without_metrics"
    else:
        result_name = "default_run"

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
    lo, hi = rates["ratio_iqr"]
    print(
        f"train throughput: Lightning {rates['lightning_samples_s']:.0f}/s, bare loop "
        f"{rates['bare_samples_s']:.0f}/s; per step {rates['lightning_step_ms']:.1f} vs "
        f"{rates['bare_step_ms']:.1f} ms (medians), {rates['overhead_ms']:.2f} ms overhead\n"
        f"Lightning / bare {rates['ratio']:.3f} (median of {rates['pairs']} paired steps, "
        f"quartiles {lo:.3f}-{hi:.3f}); with Lightning's fixed cost per fit ("
        + ", ".join(f"{s:.2f}" for s in rates["fixed_s_per_fit"])
        + " s) a one-epoch fit is "
        + " ".join(f"{r:.3f}" for r in rates["epoch_ratios"])
    )
    write_result(result_name, result)


if __name__ == "__main__":
    main()
