"""The per-input routing table: which input went to which expert, one CSV row per input.

What a researcher loads into pandas to ask their own question. Per input: its index in the
split, label, prediction, every latent attribute the data has, the chosen experts in rank
order (largest combine weight first) with their weights and their own predictions, the
assignments the capacity limit dropped, and the gate's probability vector (all E entries up
to ``FULL_PROBS_UP_TO`` experts, else the ``TOP_PROBS`` largest as expert/probability
pairs). A model that routes tokens (``model=vmoe``) gets one row per image per MoE layer,
the layer's combine weights averaged over the image's tokens.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_exp.measure.passes import eval_batches

FULL_PROBS_UP_TO = 16
TOP_PROBS = 8


def _expert_predictions(routing: Any) -> dict[tuple[int, int], int]:
    if routing.expert_predictions is None:
        return {}
    rows, ids, predicted = (t.tolist() for t in routing.expert_predictions)
    return {(r, e): p for r, e, p in zip(rows, ids, predicted, strict=True)}


def _prob_columns(probs: Tensor) -> dict[str, float]:
    e = probs.shape[-1]
    if e <= FULL_PROBS_UP_TO:
        return {f"p_e{i}": round(float(p), 6) for i, p in enumerate(probs)}
    values, experts = probs.topk(TOP_PROBS)
    out: dict[str, float] = {}
    for j, (v, i) in enumerate(zip(values.tolist(), experts.tolist(), strict=True)):
        out[f"top{j + 1}_expert"], out[f"top{j + 1}_p"] = i, round(v, 6)
    return out


def _image_rows(routing: Any) -> list[dict[str, Any]]:
    """Rows of a routing over whole inputs (one routed row per image)."""
    gates = routing.gates()
    chosen = gates.argsort(-1, descending=True)
    per_input = routing.experts_per_input()
    dropped = (routing.indices < 0).sum(-1) if routing.dropped else torch.zeros_like(per_input)
    predicted = _expert_predictions(routing)
    rows = []
    for r in range(gates.shape[0]):
        row: dict[str, Any] = {"dropped": int(dropped[r])}
        for rank, e in enumerate(chosen[r, : int(per_input[r])].tolist(), start=1):
            row[f"expert_{rank}"] = e
            row[f"weight_{rank}"] = round(float(gates[r, e]), 6)
            row[f"expert_{rank}_prediction"] = predicted.get((r, e), "")
        rows.append({**row, **_prob_columns(routing.probs[r].float())})
    return rows


def _token_rows(routing: Any, images: int, layer: int) -> list[dict[str, Any]]:
    """Rows of a token routing, averaged over each image's tokens."""
    gates = routing.gates().float().view(images, -1, routing.num_experts).mean(1)
    return [
        {f"layer{layer}_w_e{e}": round(float(w), 6) for e, w in enumerate(row)} for row in gates
    ]


def routing_rows(
    model: nn.Module,
    split: Any,
    batch_size: int,
    latent_names: Sequence[str],
    latent_values: Mapping[str, Sequence[str]],
) -> list[dict[str, Any]]:
    """The table of ``split`` under ``model`` (in eval mode, then restored)."""
    rows: list[dict[str, Any]] = []
    for start, log_probs, routings in eval_batches(model, split.images, batch_size):
        n = log_probs.shape[0]
        batch = [
            {"index": start + i, "label": int(split.labels[start + i]), "prediction": p}
            for i, p in enumerate(log_probs.argmax(-1).tolist())
        ]
        for i, row in enumerate(batch):
            for col, name in enumerate(latent_names):
                value = float(split.latents[start + i, col])
                names = latent_values.get(name)
                row[name] = names[int(value)] if names else value
        for layer, routing in enumerate(routings):
            tokens = routing.indices.shape[0] != n
            extra = _token_rows(routing, n, layer) if tokens else _image_rows(routing)
            for row, more in zip(batch, extra, strict=True):
                row.update(more)
        rows += batch
    return rows


def accuracy_by_value(
    rows: Sequence[Mapping[str, Any]], latent_values: Mapping[str, Sequence[str]], prefix: str
) -> dict[str, float]:
    """Accuracy on the inputs of each value of each discrete latent, from a split's table:
    ``{prefix}acc_colour_yellow`` is the accuracy on the yellow inputs (spaces in a value's
    name become underscores). What a held-out value (``data.hold_out``) is measured by."""
    out = {}
    for latent, names in latent_values.items():
        for name in names:
            hits = [r["prediction"] == r["label"] for r in rows if r.get(latent) == name]
            if hits:
                out[f"{prefix}acc_{latent}_{name.replace(' ', '_')}"] = sum(hits) / len(hits)
    return out


def write_routing_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the rows as CSV; columns in first-seen order (rows may differ in length)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
