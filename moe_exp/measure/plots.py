"""Pictures of who routes where (matplotlib PNGs in the run folder).

Every figure has labelled axes, names on the ticks and a colour bar where colour carries a
number, so a picture can be read without the code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor


def _save(fig, path: Path, **savefig: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, **savefig)
    plt.close(fig)
    return path


def routing_heatmap(mass: Tensor, names: Sequence[str], attribute: str, path: Path) -> Path:
    """Expert × value table as p(expert | value): each column shows where that value goes."""
    share = mass.double() / mass.double().sum(0, keepdim=True).clamp_min(1e-12)
    e, v = share.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * v + 2.5), max(2.5, 0.4 * e + 1.5)))
    image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    rotate = v > 6
    ax.set_xticks(
        range(v),
        labels=list(names),
        rotation=60 if rotate else 0,
        ha="right" if rotate else "center",
    )
    ax.set_yticks(range(e), labels=[f"expert {i}" for i in range(e)])
    ax.set_xlabel(attribute)
    ax.set_ylabel("expert")
    ax.set_title(f"routing share per {attribute}: p(expert | {attribute})")
    fig.colorbar(image, ax=ax, label="share of routing weight")
    return _save(fig, path)


def similarity_heatmap(cka: Tensor, path: Path, title: str = "expert similarity") -> Path:
    e = cka.shape[0]
    fig, ax = plt.subplots(figsize=(0.5 * e + 2.5, 0.45 * e + 2))
    image = ax.imshow(cka.numpy(), cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(e), labels=[str(i) for i in range(e)])
    ax.set_yticks(range(e), labels=[str(i) for i in range(e)])
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(f"{title} (linear CKA of outputs)")
    fig.colorbar(image, ax=ax, label="linear CKA")
    return _save(fig, path)


def load_over_epochs(history: Sequence[Mapping[str, float]], prefix: str, path: Path) -> Path:
    """Each expert's load fraction at each validation (from the validation history)."""
    pattern = re.compile(rf"^{re.escape(prefix)}load_e(\d+)$")
    keys = sorted(
        (k for k in (history[0] if history else {}) if pattern.match(k)),
        key=lambda k: int(pattern.match(k).group(1)),
    )
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # epochs trained at each validation (mid-epoch or every few epochs where configured)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for key in keys:
        ax.plot(
            epochs,
            [h.get(key, float("nan")) for h in history],
            marker="o",
            label=key.rsplit("_", 1)[1].replace("e", "expert "),
        )
    if keys:
        ax.axhline(1 / len(keys), color="grey", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("epoch")
    ax.set_ylabel("load fraction (validation)")
    ax.set_title("load per expert over epochs")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _save(fig, path)


def gate_entropy_histogram(entropies: Tensor, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(entropies.numpy(), bins=30, range=(0.0, 1.0), color="tab:blue")
    ax.set_xlabel("gate entropy per input (normalised: 0 = one expert, 1 = uniform)")
    ax.set_ylabel("inputs")
    ax.set_title("how sharply inputs are routed (test)")
    return _save(fig, path)


def examples_grid(examples: Mapping[int, Sequence[Tensor]], path: Path) -> Path:
    """Rows = experts, columns = test images whose largest combine weight is that expert.

    The images are tiled into one mosaic drawn on one axes: a grid of axes per image costs
    matplotlib a layout pass per cell, and 16 experts make over a hundred cells."""
    experts = sorted(examples)
    cols = max((len(v) for v in examples.values()), default=1) or 1
    first = next((img for v in examples.values() for img in v), torch.zeros(1, 8, 8))
    _, h, w = first.shape
    pad = 2
    mosaic = torch.ones(3, len(experts) * (h + pad), cols * (w + pad))  # white between cells
    for row, e in enumerate(experts):
        for col, img in enumerate(examples[e]):
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
            top, left = row * (h + pad), col * (w + pad)
            mosaic[:, top : top + h, left : left + w] = img.expand(3, h, w)
    fig, ax = plt.subplots(figsize=(1.1 * cols + 1, 1.1 * len(experts) + 0.5))
    ax.imshow(mosaic.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(
        [row * (h + pad) + h / 2 for row in range(len(experts))],
        labels=[f"expert {e}" for e in experts],
    )
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title("test images routed to each expert (largest weight)")
    # a fixed aspect ratio can push the row labels past the edge: crop to what was drawn
    return _save(fig, path, bbox_inches="tight")


def metric_vs_parameter(
    xs: Sequence[str],
    lines: Mapping[str, Mapping[str, tuple[float, float]]],
    metric: str,
    parameter: str,
    path: Path,
) -> Path:
    """One report plot: a metric (mean ± std over seeds) against one swept parameter, one line
    per combination of the other swept parameters (``lines``: label → x → (mean, std))."""
    beside = len(lines) > 2  # the legend goes beside the axes, where it covers no point
    width = max(4.0, 0.6 * len(xs) + 2) + (3.5 if beside else 0.0)
    fig, ax = plt.subplots(figsize=(width, 3.2))
    if len(lines) > 10:  # the default cycle repeats its colours after ten
        ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(len(lines))])
    position = {x: i for i, x in enumerate(xs)}
    for label, points in lines.items():
        at = [x for x in xs if x in points]
        ax.errorbar(
            [position[x] for x in at],
            [points[x][0] for x in at],
            yerr=[points[x][1] for x in at],
            marker="o",
            capsize=3,
            linestyle="-",
            label=label or None,
        )
    ax.set_xticks(range(len(xs)), labels=list(xs), rotation=30 if len(xs) > 4 else 0)
    ax.set_xlabel(parameter)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {parameter}")
    ax.grid(alpha=0.3)
    if beside:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return _save(fig, path, bbox_inches="tight")
    if any(lines):  # a line has a label unless it is the only one and nothing else was swept
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def run_plots(module, names: Mapping[str, Sequence[str]], out_dir: Path) -> list[Path]:
    """Every routing picture of a finished run: heatmaps per layer, loads, entropy, examples.

    ``names`` maps "label" and each discrete latent to its value names.
    """
    paths: list[Path] = []
    layers = module.test_tables
    for i, stats in enumerate(layers):
        tag = f"layer{i}_" if len(layers) > 1 else ""
        if stats.class_mass.numel():
            paths.append(
                routing_heatmap(
                    stats.class_mass, names["label"], "class", out_dir / f"{tag}expert_class.png"
                )
            )
        for attr, mass in stats.latent_mass.items():
            paths.append(
                routing_heatmap(
                    mass,
                    names.get(attr, [str(j) for j in range(mass.shape[1])]),
                    attr,
                    out_dir / f"{tag}expert_{attr}.png",
                )
            )
        if stats.gate_entropies:
            paths.append(
                gate_entropy_histogram(
                    torch.cat(stats.gate_entropies), out_dir / f"{tag}gate_entropy.png"
                )
            )
        prefix = f"layer{i}/" if len(layers) > 1 else ""
        if module.history["val"]:
            paths.append(
                load_over_epochs(
                    module.history["val"], prefix, out_dir / f"{tag}load_over_epochs.png"
                )
            )
    if module.examples:
        paths.append(examples_grid(module.examples, out_dir / "examples_per_expert.png"))
    return paths
