"""Routers: input features -> logits over experts -> (combine weights, chosen experts).

Every router is an ``nn.Module`` taking ``(in_features, num_experts, ...)`` and returning a
:class:`~moe_exp.moe.routing.Routing` from ``forward(h)`` with ``h`` of shape [N, in_features].
Sparse routers also take ``capacity_factor`` (None: no limit); assignments beyond
ceil(capacity_factor · k · N / E) per expert are dropped by the shared
:func:`~moe_exp.moe.routing.limit_capacity` (first choices first, then input order).

A convention worth knowing: weights normalised over the k kept experts sum to 1, so with
k = 1 they are constant and the task loss gives the router no gradient (only regularizers
train it). Switch and BASE instead weight by the router's own probability / sigmoid score,
as their papers do, and expert choice by the chosen pairs' probabilities, so their weights
sum to less than 1 per input (a residual path must carry the rest; the whole-image mixture
gives it to the uniform distribution).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.routing import Routing, expert_capacity, limit_capacity


class Router(nn.Module):
    """A linear router: logits = h · W (+ b). Subclasses decide who gets each input.

    ``renormalises_kept``: the combine weights are renormalised over the k kept experts, so
    with k = 1 every weight is 1 and the task loss gives the router no gradient (only aux
    losses train it); such gates warn at k = 1 (the switch gate weights by p_i instead).
    """

    renormalises_kept = False

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = None,
        linear: bool = True,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        if k == 1 and num_experts > 1 and self.renormalises_kept:
            warnings.warn(
                f"{type(self).__name__} with k=1 renormalises the one kept weight to 1: the "
                "router gets no gradient from the task loss, only from aux losses; use the "
                "switch gate (weight p_i) for learned top-1 routing",
                stacklevel=2,
            )
        if linear:
            self.proj = nn.Linear(in_features, num_experts)

    def logits(self, h: Tensor) -> Tensor:
        return self.proj(h)

    def _route(self, logits: Tensor, probs: Tensor, weights: Tensor, indices: Tensor, **extra):
        """The routing record, with the capacity limit applied when ``capacity_factor`` is set."""
        capacity, dropped = None, 0
        if self.capacity_factor is not None:
            n, k = indices.shape
            capacity = expert_capacity(self.capacity_factor, k, n, self.num_experts)
            indices, weights, dropped = limit_capacity(indices, weights, self.num_experts, capacity)
        return Routing(
            logits=logits,
            probs=probs,
            weights=weights,
            indices=indices,
            dropped=dropped,
            capacity=capacity,
            **extra,
        )


class SoftmaxGate(Router):
    """Dense softmax gating: every expert runs on every input, weighted by softmax(h·W).

    Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive mixtures of local experts".
    ``k`` is accepted for a uniform signature and ignored: a dense gate uses all experts.
    """

    def __init__(self, in_features: int, num_experts: int, k: int | None = None) -> None:
        super().__init__(in_features, num_experts, k=num_experts)

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        indices = torch.arange(self.num_experts, device=h.device).expand(h.shape[0], -1)
        return Routing(logits=logits, probs=probs, weights=probs, indices=indices)


def _top_k_routing(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pick the k largest logits; weights = softmax over the kept ones."""
    top_values, indices = logits.topk(k, dim=-1)
    return top_values.softmax(-1), indices


class TopKGate(Router):
    """Top-k gating: keep the k largest logits, softmax over them, zero elsewhere.

    The sparsely-gated layer of Shazeer et al. (2017) without the noise term.
    """

    renormalises_kept = True

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        weights, indices = _top_k_routing(logits, self.k)
        return self._route(logits, logits.softmax(-1), weights, indices)


class NoisyTopKGate(TopKGate):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks", eq. 3-5).

    H(x)_i = (x·W_g)_i + ε·softplus((x·W_noise)_i), ε ~ N(0, 1), during training only;
    G(x) = softmax(KeepTopK(H(x), k)). Both projections start at zero, as in the paper, so
    early routing is pure noise and every expert gets inputs. The record also carries the
    smooth load estimator P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / σ_i(x))
    (paper appendix A), which the load loss differentiates.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(in_features, num_experts, k, capacity_factor)
        self.noise = nn.Linear(in_features, num_experts)
        for layer in (self.proj, self.noise):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: Tensor) -> Routing:
        if not self.training:
            return super().forward(h)  # plain top-k on the clean logits
        clean = self.logits(h)
        std = F.softplus(self.noise(h)) + 1e-2  # floor: keeps the Φ argument finite
        noisy = clean + torch.randn_like(clean) * std
        weights, indices = _top_k_routing(noisy, self.k)
        smooth_load = self._smooth_load(clean, noisy, std)
        return self._route(clean, clean.softmax(-1), weights, indices, smooth_load=smooth_load)

    def _smooth_load(self, clean: Tensor, noisy: Tensor, std: Tensor) -> Tensor:
        """P(x, i): probability that expert i stays in the top k when only its noise is redrawn."""
        if self.k >= self.num_experts:
            return torch.ones_like(clean)
        top = noisy.topk(self.k + 1, dim=-1).values
        threshold_if_in = top[:, self.k : self.k + 1]  # k-th largest of the others when i is in
        threshold_if_out = top[:, self.k - 1 : self.k]  # k-th largest overall when i is out
        is_in = noisy > threshold_if_in
        threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
        # Φ via ndtr: no argument validation, so a diverging run reaches the loss check as NaN
        return torch.special.ndtr((clean - threshold) / std)


class SwitchGate(Router):
    """Switch routing (Fedus et al. 2021, "Switch Transformers"): top-1, weight = p_i(x).

    The combine weight is the router probability of the chosen expert (not renormalised to
    1), which is how the router gets a task gradient with a single expert. In training the
    router input is multiplied by uniform noise in [1 − jitter, 1 + jitter] (the paper's
    jitter, eps = 0.01), and the router runs in float32 even under autocast (the paper's
    "selective precision"). ``logits`` records the (jittered) logits actually used.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        capacity_factor: float | None = None,
        jitter: float = 0.01,
    ) -> None:
        super().__init__(in_features, num_experts, 1, capacity_factor)
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.jitter = jitter

    def forward(self, h: Tensor) -> Routing:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = F.linear(h, self.proj.weight.float(), self.proj.bias.float())
            probs = logits.softmax(-1)
            weights, indices = probs.max(-1, keepdim=True)
        return self._route(logits, probs, weights, indices)


class ExpertChoiceGate(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C inputs.

    C = ceil(capacity_factor · N / E), so on average each input gets ``capacity_factor``
    experts (2 ~ top-2). Scores are the softmax over experts; an input's weight for an
    expert that chose it is that score (not renormalised), and an input no expert chose gets
    no expert at all (weight 0 everywhere; a residual path must carry it). Every expert gets
    exactly C inputs, so load is balanced by construction. ``indices`` is [N, E]: the expert
    id where it chose the input, -1 elsewhere; :meth:`Routing.experts_per_input` counts.
    The choice is over the batch, so an input's experts depend on the rest of its batch, in
    evaluation too. ``k`` is ``capacity_factor`` (mean experts per input, maybe fractional).
    """

    def __init__(self, in_features: int, num_experts: int, capacity_factor: float = 2.0) -> None:
        super().__init__(in_features, num_experts, 1, capacity_factor)
        self.k = capacity_factor

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        n, e = probs.shape
        capacity = min(n, expert_capacity(self.capacity_factor, 1, n, e))
        chosen = probs.topk(capacity, dim=0).indices  # [C, E] input ids per expert
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask.scatter_(0, chosen, True)
        experts = torch.arange(e, device=h.device).expand(n, e)
        return Routing(
            logits=logits,
            probs=probs,
            weights=probs.masked_fill(~mask, 0.0),
            indices=experts.masked_fill(~mask, -1),
            capacity=capacity,
        )


class SoftMoEGate(Router):
    """Soft MoE (Puigcerver et al. 2023, "From sparse to soft mixtures of experts").

    Logits L = h·Φ over E·S slots (S = ``slots_per_expert``). Dispatch weights are the
    softmax of L over the inputs (per slot): each slot's input is a convex combination of
    inputs. Combine weights are the softmax of L over all slots (per input): each output
    mixes all slot outputs. So inputs are mixed with each other, in training and evaluation
    alike (that is the method). By default the whole batch is one group (whole images get
    mixed); ``group_size`` = T splits the N inputs into consecutive groups of T (e.g. one
    image's tokens, as in the paper), each with its own E·S slots, mixing only within a group.
    The record's ``weights``/``probs`` are the combine weights summed per expert, ``load``
    and importance are their sums over the batch. ``k`` is E: every expert sees every input.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        slots_per_expert: int = 1,
        group_size: int | None = None,
    ) -> None:
        super().__init__(in_features, num_experts, num_experts, linear=False)
        if slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be >= 1, got {slots_per_expert}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
        self.slots_per_expert = slots_per_expert
        self.group_size = group_size
        self.proj = nn.Linear(in_features, num_experts * slots_per_expert, bias=False)

    def forward(self, h: Tensor) -> Routing:
        n, e, s = h.shape[0], self.num_experts, self.slots_per_expert
        t = self.group_size or n
        if n % t:
            raise ValueError(f"{n} inputs do not split into groups of group_size={t}")
        slot_logits = self.proj(h).view(n, e, s)
        dispatch = slot_logits.view(n // t, t, e, s).softmax(1).view(n, e, s)
        combine = slot_logits.reshape(n, e * s).softmax(-1).view(n, e, s)
        probs = combine.sum(-1)  # == softmax(logits) below
        indices = torch.arange(e, device=h.device).expand(n, e)
        return Routing(
            logits=slot_logits.logsumexp(-1),
            probs=probs,
            weights=probs,
            indices=indices,
            dispatch=dispatch,
            combine=combine,
            groups=n // t,
        )


class HashGate(Router):
    """Hash routing (Roller et al. 2021, "Hash layers for large sparse models"), for images.

    Roller et al. hash token ids; an image has none, so this hashes the router input by a
    fixed random projection (seeded, a buffer) and sends it to the argmax bucket (top-k for
    k > 1, weights 1/k). The input is centred by a running mean (updated in training, no
    gradient) first, otherwise non-negative features (post-ReLU) fall mostly in one bucket.
    Routing ignores learning: no trainable parameters, no gradient to the router input, and
    regularizers cannot change it. A baseline for "does learned routing matter?".
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float | None = None,
        seed: int = 0,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(in_features, num_experts, k, capacity_factor, linear=False)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "projection", torch.randn(in_features, num_experts, generator=generator)
        )
        self.register_buffer("center", torch.zeros(in_features))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.momentum = momentum

    def logits(self, h: Tensor) -> Tensor:
        h = h.detach().float()
        if self.training:
            mean = h.mean(0)
            if int(self.batches_seen) == 0:
                self.center.copy_(mean)
            else:
                self.center.lerp_(mean, self.momentum)
            self.batches_seen += 1
        return (h - self.center) @ self.projection

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        indices = logits.topk(self.k, dim=-1).indices
        weights = logits.new_full(indices.shape, 1.0 / self.k)
        return self._route(logits, logits.softmax(-1), weights, indices)


class BASEGate(Router):
    """BASE layers (Lewis et al. 2021): balanced assignment in training, greedy in evaluation.

    Training: each expert gets exactly N/E inputs (ceil(N/E) when E does not divide N),
    chosen to maximise the summed router scores. ``assignment="sinkhorn"`` (default) solves
    this approximately (:func:`sinkhorn_assignment`, as S-BASE, Clark et al. 2022): within 1%
    of the best total score on random scores, ~12 ms at N=4096, E=16. ``"exact"`` solves it
    exactly (:func:`balanced_assignment`; the paper uses an auction algorithm for the same
    problem), which grows as N³: 28 ms at N=1024, seconds at N=4096. Evaluation: top-1.
    The combine weight is σ(score) (``weighting="sigmoid"``, as in the paper, where a
    residual carries the rest) or the softmax probability (``"softmax"``); both < 1.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        capacity_factor: float | None = None,
        weighting: str = "sigmoid",
        assignment: str = "sinkhorn",
    ) -> None:
        super().__init__(in_features, num_experts, 1, capacity_factor)
        if weighting not in ("sigmoid", "softmax"):
            raise ValueError(f"weighting={weighting!r} is not one of sigmoid, softmax")
        if assignment not in BALANCED_ASSIGNMENTS:
            choices = ", ".join(BALANCED_ASSIGNMENTS)
            raise ValueError(f"assignment={assignment!r} is not one of {choices}")
        self.weighting = weighting
        self.assignment = assignment

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        if self.training:
            indices = BALANCED_ASSIGNMENTS[self.assignment](logits.detach()).unsqueeze(-1)
        else:
            indices = logits.argmax(-1, keepdim=True)
        scores = logits.gather(1, indices)
        weights = scores.sigmoid() if self.weighting == "sigmoid" else probs.gather(1, indices)
        return self._route(logits, probs, weights, indices)


def balanced_assignment(scores: Tensor) -> Tensor:
    """Expert per input maximising Σ scores with at most ceil(N/E) inputs per expert (exact)."""
    from scipy.optimize import linear_sum_assignment  # lazy: only BASE training needs scipy

    n, e = scores.shape
    per_expert = expert_capacity(1.0, 1, n, e)  # ceil(N/E)
    repeated = scores.double().cpu().repeat_interleave(per_expert, dim=1)  # [N, E·N/E]
    rows, cols = linear_sum_assignment(repeated.numpy(), maximize=True)
    experts = torch.empty(n, dtype=torch.long)
    experts[torch.from_numpy(rows)] = torch.from_numpy(cols // per_expert)
    return experts.to(scores.device)


def sinkhorn_assignment(scores: Tensor, iterations: int = 20) -> Tensor:
    """Expert per input with at most ceil(N/E) inputs per expert, near the best total score.

    Sinkhorn iterations (as in S-BASE, Clark et al. 2022, "Unified scaling laws for routed
    language models") scale exp(scores) into a plan whose rows sum to 1 and columns to N/E;
    each input then takes its most planned expert. An expert chosen by more than ceil(N/E)
    keeps those it plans most for; the others choose again among experts with room, so the
    cap holds exactly. O(N·E) per iteration (20 reach a fixed point on random scores).
    """
    n, e = scores.shape
    capacity = expert_capacity(1.0, 1, n, e)  # ceil(N/E)
    plan = scores.detach().float()
    for _ in range(iterations):  # in log space; the column target N/E is a constant shift
        plan = plan - plan.logsumexp(1, keepdim=True)
        plan = plan - plan.logsumexp(0, keepdim=True)
    experts = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    taken = torch.zeros(e, dtype=torch.long, device=scores.device)
    waiting = torch.arange(n, device=scores.device)
    while waiting.numel():  # each round fills at least one expert: at most E rounds
        value, choice = plan[waiting].max(1)
        order = torch.argsort(value, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # by expert, best first
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=e)
        first = counts.cumsum(0) - counts  # each expert's first place in ``chosen``
        rank = torch.arange(chosen.numel(), device=scores.device) - first[chosen]
        accept = rank < (capacity - taken)[chosen]
        experts[waiting[order[accept]]] = chosen[accept]
        taken += torch.bincount(chosen[accept], minlength=e)
        plan[:, taken >= capacity] = float("-inf")
        waiting = waiting[order[~accept]]
    return experts


BALANCED_ASSIGNMENTS = {"sinkhorn": sinkhorn_assignment, "exact": balanced_assignment}


class BiasBalancedGate(Router):
    """Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-loss-free load balancing
    strategy for mixture-of-experts"; used by DeepSeek-V3).

    Experts are chosen by top-k of (score + b), with score = σ(logits) (or softmax), and
    combined with the unbiased scores normalised over the chosen k. The bias b is a buffer,
    not trained by gradient: after each training forward it moves by
    γ · sign(mean load − load_i) (γ = ``bias_update_rate``, paper 0.001), with the routing
    record's load (after any capacity drop). ``update_in_forward=False`` leaves that to an explicit
    :meth:`update_bias` call (e.g. once per optimizer step with gradient accumulation). The
    bias never changes in evaluation. Under DDP the loads are summed over ranks first.
    """

    renormalises_kept = True

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        score: str = "sigmoid",
        bias_update_rate: float = 0.001,
        update_in_forward: bool = True,
    ) -> None:
        super().__init__(in_features, num_experts, k, capacity_factor)
        if score not in ("sigmoid", "softmax"):
            raise ValueError(f"score={score!r} is not one of sigmoid, softmax")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.score = score
        self.bias_update_rate = bias_update_rate
        self.update_in_forward = update_in_forward
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, h: Tensor) -> Routing:
        logits = self.logits(h)
        probs = logits.softmax(-1)
        scores = logits.sigmoid() if self.score == "sigmoid" else probs
        indices = (scores.detach() + self.bias).topk(self.k, dim=-1).indices
        chosen = scores.gather(1, indices)
        weights = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-9)
        routing = self._route(logits, probs, weights, indices)
        if self.training and self.update_in_forward:
            self.update_bias(routing)
        return routing

    @torch.no_grad()
    def update_bias(self, routing: Routing) -> None:
        """b_i += γ · sign(mean load − load_i), from the record's load (after any capacity
        drop, the same in forward and in an explicit call)."""
        load = routing.load().to(self.bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.bias += self.bias_update_rate * torch.sign(load.mean() - load)


class CosineGate(TopKGate):
    """Cosine router (X-MoE, Chi et al. 2022, "On the representation collapse of sparse MoE").

    logits_i = cos(W·h, e_i) / τ: the input is projected to a low dimension (16), compared
    with L2-normalised expert embeddings, divided by a learnable temperature τ (init 0.07,
    clamped to >= ``min_temperature`` so logits stay bounded), then top-k with weights
    softmax over the kept logits.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        capacity_factor: float | None = None,
        dim: int = 16,
        temperature: float = 0.07,
        min_temperature: float = 0.01,
    ) -> None:
        super().__init__(in_features, num_experts, k, capacity_factor, linear=False)
        self.proj = nn.Linear(in_features, dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.min_temperature = min_temperature

    def logits(self, h: Tensor) -> Tensor:
        cos = F.normalize(self.proj(h), dim=-1) @ F.normalize(self.expert_embeddings, dim=-1).T
        return cos / self.temperature.clamp_min(self.min_temperature)


class HierarchicalGate(Router):
    """Two-level gating (Jordan & Jacobs 1994; Shazeer et al. 2017, appendix B).

    A top gate over G = ``num_groups`` groups keeps ``k_group`` groups; each group's own gate
    over its E/G experts keeps ``k`` of them (softmax over the kept, at both levels). Weight
    = group weight × expert weight, so each input gets k_group·k experts (``self.k``).
    ``probs`` is the two-level distribution p(g)·p(e|g); ``logits`` the summed raw logits.
    With k_group = 1 the group weight is 1 and the top gate learns only via regularizers.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 1,
        num_groups: int = 2,
        k_group: int = 1,
        capacity_factor: float | None = None,
    ) -> None:
        if num_groups < 1 or num_experts % num_groups:
            divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
            raise ValueError(
                f"num_groups={num_groups} must divide num_experts={num_experts} "
                f"(valid: {', '.join(map(str, divisors))})"
            )
        per_group = num_experts // num_groups
        if not 1 <= k <= per_group:
            raise ValueError(f"k must be in [1, experts per group={per_group}], got {k}")
        if not 1 <= k_group <= num_groups:
            raise ValueError(f"k_group must be in [1, num_groups={num_groups}], got {k_group}")
        super().__init__(in_features, num_experts, k * k_group, capacity_factor, linear=False)
        self.num_groups, self.per_group = num_groups, per_group
        self.k_within, self.k_group = k, k_group
        self.group_proj = nn.Linear(in_features, num_groups)
        self.proj = nn.Linear(in_features, num_experts)  # row block g = group g's own gate

    def forward(self, h: Tensor) -> Routing:
        n, g, m = h.shape[0], self.num_groups, self.per_group
        group_logits = self.group_proj(h)  # [N, G]
        expert_logits = self.proj(h).view(n, g, m)  # [N, G, E/G]
        group_weights, groups = _top_k_routing(group_logits, self.k_group)
        kept = expert_logits.gather(1, groups.unsqueeze(-1).expand(-1, -1, m))  # [N, kg, E/G]
        expert_weights, local = _top_k_routing(kept, self.k_within)  # [N, kg, k]
        weights = (group_weights.unsqueeze(-1) * expert_weights).flatten(1)
        indices = (groups.unsqueeze(-1) * m + local).flatten(1)
        probs = group_logits.softmax(-1).unsqueeze(-1) * expert_logits.softmax(-1)
        logits = group_logits.unsqueeze(-1) + expert_logits
        return self._route(logits.flatten(1), probs.flatten(1), weights, indices)
