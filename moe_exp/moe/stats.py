"""Utilisation and specialisation metrics from routing records, accumulated over an epoch.

Load = assignments per expert; importance = summed combine weights (Shazeer et al. 2017).
Specialisation = normalised mutual information between the routing and the class label
(or a latent attribute), from the routing mass: each input spreads its combine weights over
its experts, so k > 1 and dense gates are measured without picking one "chosen" expert.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from moe_exp.moe.balance import entropy
from moe_exp.moe.routing import Routing


def coefficient_of_variation(x: Tensor) -> float:
    """std/mean with population std; 0 for a single expert."""
    x = x.double()
    if x.numel() <= 1 or float(x.mean()) == 0.0:
        return 0.0
    return float(x.std(unbiased=False) / x.mean())


def normalized_entropy(load: Tensor) -> float:
    """Entropy of the load distribution divided by log(E): 1 = uniform, 0 = one expert."""
    e = load.numel()
    return 1.0 if e <= 1 else float(_entropy(load.double()) / math.log(e))


def _entropy(counts: Tensor) -> Tensor:
    """Entropy of a 1-D table of counts or masses, normalised to a distribution first."""
    return entropy(counts / counts.sum().clamp_min(torch.finfo(counts.dtype).tiny))


def normalized_mutual_information(joint: Tensor) -> float:
    """NMI of a joint count table [E, V]: 2·I(E; V) / (H(E) + H(V)) (arithmetic mean
    normalisation, scikit-learn's default); 1 = each expert serves exactly one value."""
    joint = joint.double()
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    h_rows, h_cols = _entropy(p.sum(1)), _entropy(p.sum(0))
    if float(h_rows + h_cols) == 0.0:
        return 1.0
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / outer[nz]).log()).sum()
    return float((2 * mi / (h_rows + h_cols)).clamp(0.0, 1.0))


def gate_entropy(probs: Tensor) -> Tensor:
    """Per-input entropy of the router distribution over experts, normalised by log(E)."""
    e = probs.shape[-1]
    h = entropy(probs.double())
    return h / math.log(e) if e > 1 else torch.zeros_like(h)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between two representations of the same inputs (Kornblith et al. 2019):
    1 for identical (up to rotation and scale) outputs, near 0 for unrelated ones."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (x.T @ y).norm() ** 2
    norm = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / norm) if norm > 0 else 0.0


def effective_count(amounts: Tensor) -> float:
    """exp(H(shares)), the perplexity of the shares: how many experts the amounts are spread
    over as if evenly (1 = one expert, E = uniform). Used in the load-balancing literature
    as the effective number of experts."""
    if float(amounts.double().sum()) <= 0:
        return 0.0
    return float(_entropy(amounts.double()).exp())


def balance_metrics(
    load: Tensor, importance: Tensor, dead_threshold: float = 0.1
) -> dict[str, float]:
    """Scalar balance numbers from per-expert load counts and importance sums.

    Load says who computes, importance (the combine weight) who does the work: an expert
    that is everyone's second choice gets its share of inputs but almost no weight. An
    expert is dead by load or by weight when its share is under ``dead_threshold`` × the
    uniform share; ``dead_experts`` counts experts dead either way.
    """
    fraction = load.double() / load.double().sum().clamp_min(1e-12)
    weight = importance.double() / importance.double().sum().clamp_min(1e-12)
    mean = float(fraction.mean())
    max_over_mean = float(fraction.max()) / mean if mean > 0 else 0.0
    floor = dead_threshold / max(load.numel(), 1)
    dead_load, dead_weight = fraction < floor, weight < floor
    return {
        "cv_load": coefficient_of_variation(load),
        "cv_importance": coefficient_of_variation(importance),
        "max_mean_load": max_over_mean,
        # MaxVio = (max load − mean load) / mean load (Wang et al. 2024, loss-free balancing)
        "max_vio": max_over_mean - 1.0 if mean > 0 else 0.0,
        "load_entropy": normalized_entropy(load),
        "effective_experts": effective_count(importance),
        "effective_experts_load": effective_count(load),
        "dead_experts_load": float(dead_load.sum()),
        "dead_experts_weight": float(dead_weight.sum()),
        "dead_experts": float((dead_load | dead_weight).sum()),
    }


def _per_input(values: Tensor, n_routed: int) -> Tensor:
    """Labels are per image; a layer routing T tokens per image repeats each label T times."""
    if n_routed == values.shape[0]:
        return values
    if values.shape[0] and n_routed % values.shape[0] == 0:
        return values.repeat_interleave(n_routed // values.shape[0], dim=0)
    raise ValueError(f"cannot match {values.shape[0]} labels to {n_routed} routed inputs")


class RoutingStats:
    """Accumulates one MoE layer's routing over many batches, on the routing's own device:
    a training step adds no device-to-host copy, and :meth:`compute` moves the sums to the
    host once (per epoch).

    A batch's routing is queued and summed with the next ``FLUSH_EVERY`` batches' in one
    pass: each of the ~50 tensor operations the sums take has a fixed dispatch cost, which
    per batch is a few percent of a small model's training step (and a kernel launch each
    on a GPU). Everything that reads the sums flushes the queue first.

    ``num_classes`` enables the expert × class table; ``latents`` maps a discrete latent
    attribute's name to (column in the latents tensor, number of values).
    """

    COUNTS = ("dropped", "experts_received", "unrouted", "entropy_sum")
    FLUSH_EVERY = 32

    def __init__(
        self,
        num_experts: int,
        num_classes: int | None = None,
        latents: Mapping[str, tuple[int, int]] | None = None,
        dead_threshold: float = 0.1,
    ) -> None:
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.latents = dict(latents or {})
        self.dead_threshold = dead_threshold
        self.reset()

    def reset(self, device: torch.device | str | None = None) -> None:
        e = self.num_experts

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.load, self.importance = zeros(e), zeros(e)
        self.class_mass = zeros(e, self.num_classes or 0)
        self.latent_mass = {name: zeros(e, values) for name, (_, values) in self.latents.items()}
        self.expert_correct, self.expert_seen = zeros(e), zeros(e)
        self.counts = zeros(len(self.COUNTS))  # summed on the device, read in compute()
        self.gate_entropies: list[Tensor] = []  # this process's, for histograms
        self._queued: list[tuple[Routing, Tensor | None, Tensor | None]] = []
        self.assignments = 0  # sizes, known on the host without a copy
        self.inputs = 0
        self.entropy_count = 0

    @torch.no_grad()
    def update(
        self, routing: Routing, labels: Tensor | None = None, latents: Tensor | None = None
    ) -> None:
        """Queue a batch's routing (detached: the queue must not keep its graph alive)."""
        kept = Routing(
            routing.logits.detach(),
            routing.probs.detach(),
            routing.weights.detach(),
            routing.indices,
            dropped=routing.dropped,
            expert_predictions=routing.expert_predictions,
            # soft routing's mark (its load is its importance), without the [N, E, S] tensor
            dispatch=None if routing.dispatch is None else routing.dispatch.detach()[:0],
        )
        self._queued.append((kept, labels, latents))
        if len(self._queued) >= self.FLUSH_EVERY:
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        """Add the queued batches to the sums, concatenated into one routing."""
        if not self._queued:
            return
        routings, labels, latents = zip(*self._queued, strict=True)
        self._queued = []
        self._add(
            _concatenated(list(routings)),
            torch.cat(labels) if labels[0] is not None else None,
            torch.cat(latents) if latents[0] is not None else None,
        )

    def _add(self, routing: Routing, labels: Tensor | None, latents: Tensor | None) -> None:
        device = routing.weights.device
        if self.load.device != device:  # the first batch says where the sums live
            self.reset(device)
        gates = routing.gates().double()  # importance = its column sums
        self.load += routing.load().double()
        self.importance += gates.sum(0)
        self.assignments += routing.indices.numel()
        received = routing.experts_per_input()
        self.inputs += received.numel()
        entropies = gate_entropy(routing.probs).float()
        self.gate_entropies.append(entropies)
        self.entropy_count += entropies.numel()
        # the four counts in one addition
        self.counts += torch.stack(
            [
                torch.full((), routing.dropped, dtype=torch.float64, device=device),
                received.sum().double(),
                (received == 0).sum().double(),
                entropies.double().sum(),
            ]
        )
        n = gates.shape[0]
        if self.num_classes and labels is not None:
            y = _per_input(labels, n)
            self.class_mass.index_add_(1, y, gates.T)
            if routing.expert_predictions is not None:
                rows, experts, predicted = routing.expert_predictions
                correct = (predicted == y[rows]).double()
                self.expert_correct.index_add_(0, experts, correct)
                self.expert_seen.index_add_(0, experts, torch.ones_like(correct))
        if latents is not None:
            for name, (column, _) in self.latents.items():
                values = _per_input(latents[:, column].long(), n)
                self.latent_mass[name].index_add_(1, values, gates.T)

    def _sums(self) -> list[Tensor]:
        self._flush()
        return [self.load, self.importance, self.class_mass, self.expert_correct,
                self.expert_seen, *self.latent_mass.values(), self.counts]  # fmt: skip

    def sync(self, device: torch.device | str | None = None) -> None:
        """Sum the accumulators over all processes (DDP), once per epoch before
        :meth:`compute`, so every rank reports the routing of the whole epoch's data.
        ``device``: where the collective runs (the process's GPU under NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        self._flush()  # the host-side sizes below are counted as the queue is summed
        sizes = torch.tensor(
            [self.assignments, self.inputs, self.entropy_count], dtype=torch.float64
        )
        tensors = [*self._sums(), sizes]
        flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        self.assignments, self.inputs, self.entropy_count = (round(v) for v in sizes.tolist())

    def host(self) -> RoutingStats:
        """A copy with every sum on the host (one transfer), for compute and plots."""
        copy = RoutingStats.__new__(RoutingStats)
        sums = self._sums()  # flushes the queue
        copy.__dict__.update(self.__dict__)
        copy.load, copy.importance, copy.class_mass = (t.cpu() for t in sums[:3])
        copy.expert_correct, copy.expert_seen = self.expert_correct.cpu(), self.expert_seen.cpu()
        copy.latent_mass = {k: v.cpu() for k, v in self.latent_mass.items()}
        copy.counts = self.counts.cpu()
        copy.gate_entropies = [t.cpu() for t in self.gate_entropies]
        return copy

    def compute(self) -> dict[str, float]:
        """Scalar metrics plus per-expert ``load_e{i}`` and ``importance_e{i}`` fractions."""
        self._flush()
        if self.load.device.type != "cpu":
            return self.host().compute()
        dropped, received, unrouted, entropy_sum = self.counts.tolist()
        out = balance_metrics(self.load, self.importance, self.dead_threshold)
        load_frac = self.load / self.load.sum().clamp_min(1e-12)
        imp_frac = self.importance / self.importance.sum().clamp_min(1e-12)
        for i in range(self.num_experts):
            out[f"load_e{i}"] = float(load_frac[i])
            out[f"importance_e{i}"] = float(imp_frac[i])
        out["dropped_fraction"] = dropped / max(self.assignments, 1)
        out["experts_per_input"] = received / max(self.inputs, 1)
        out["unrouted_fraction"] = unrouted / max(self.inputs, 1)
        if self.entropy_count:
            out["gate_entropy"] = entropy_sum / self.entropy_count
        if self.num_classes:
            out["nmi_label"] = normalized_mutual_information(self.class_mass)
        if self.expert_seen.sum() > 0:  # each expert's own accuracy on the inputs routed to it
            for i in range(self.num_experts):
                seen = float(self.expert_seen[i])
                out[f"acc_e{i}"] = float(self.expert_correct[i]) / seen if seen else float("nan")
        for name, mass in self.latent_mass.items():
            out[f"nmi_{name}"] = normalized_mutual_information(mass)
        return out


def _concatenated(routings: list[Routing]) -> Routing:
    """One routing of the batches one after another; each batch's expert-prediction rows
    shifted to its place in the concatenation."""
    if len(routings) == 1:
        return routings[0]
    first = routings[0]
    predictions = None
    if all(r.expert_predictions is not None for r in routings):
        offsets = itertools.accumulate((r.weights.shape[0] for r in routings[:-1]), initial=0)
        rows, experts, predicted = zip(*(r.expert_predictions for r in routings), strict=True)
        predictions = (
            torch.cat([r + offset for r, offset in zip(rows, offsets, strict=True)]),
            torch.cat(experts),
            torch.cat(predicted),
        )
    return dataclasses.replace(
        first,
        logits=torch.cat([r.logits for r in routings]),
        probs=torch.cat([r.probs for r in routings]),
        weights=torch.cat([r.weights for r in routings]),
        indices=torch.cat([r.indices for r in routings]),
        dropped=sum(r.dropped for r in routings),
        expert_predictions=predictions,
    )
