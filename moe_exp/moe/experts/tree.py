"""Soft decision-tree experts (Frosst & Hinton 2017) and their balance penalty."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.balance import Regularizer
from moe_exp.moe.experts.dense import check_dropout
from moe_exp.moe.routing import Routing
from moe_exp.moe.rules import Composition, below_minimum, require


class SoftTreeExpert(nn.Module):
    """A soft (differentiable) binary decision tree (Frosst & Hinton 2017, "Distilling a
    neural network into a soft decision tree").

    Inner node i (breadth-first, root 0, children 2i+1 left and 2i+2 right) takes the right
    branch with probability p_i(x) = σ(β(x·w_i + b_i)), β the inverse temperature. A leaf's
    path probability P^ℓ(x) is the product of the branch probabilities on its path; leaf ℓ
    holds a learned class distribution Q^ℓ = softmax(φ^ℓ). The tree's prediction is the
    mixture p(y|x) = Σ_ℓ P^ℓ(x) Q^ℓ_y (the paper's training-time objective; at test time the
    paper also uses the single most probable leaf, not done here), and ``forward`` returns its
    log, log p(y|x): logits whose softmax is the mixture, like every other expert's logits.

    Each forward also stores the unweighted balance penalty of the paper (sec. 4),
    C = −Σ_i 2^−d(i) · ½ (log α_i + log(1 − α_i)), α_i = Σ_x P^i(x) p_i(x) / Σ_x P^i(x), with
    P^i(x) the probability of reaching node i and d(i) its depth (root 0), over the inputs of
    that call. :class:`TreeBalanceLoss` collects it (its ``weight`` is the paper's λ). The
    paper's running averages of α over batches for deep nodes are not used. The input is
    flattened; ``dropout`` applies to it (the tree has no hidden layer).
    """

    min_values = {"depth": 1}

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        depth: int = 4,
        beta: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        require(below_minimum(SoftTreeExpert, {"depth": depth}))
        if beta <= 0:
            raise ValueError(f"tree beta (inverse temperature) must be > 0, got {beta}")
        self.depth = depth
        self.beta = float(beta)
        self.drop = nn.Dropout(check_dropout(dropout))
        self.inner = nn.Linear(math.prod(in_shape), 2**depth - 1)
        self.leaf_logits = nn.Parameter(0.01 * torch.randn(2**depth, num_outputs))
        # 2^-d(i) for the inner nodes in breadth-first order
        node_depth = torch.cat([torch.full((2**d,), float(d)) for d in range(depth)])
        self.register_buffer("node_decay", torch.pow(2.0, -node_depth), persistent=False)
        self.last_penalty: Tensor | None = None

    def _log_branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log(1 − p_i(x)), log p_i(x)) for every inner node, each [N, 2^depth − 1]."""
        z = self.beta * self.inner(self.drop(x.flatten(1)))
        return F.logsigmoid(-z), F.logsigmoid(z)

    def _log_reach(self, log_left: Tensor, log_right: Tensor) -> tuple[Tensor, Tensor]:
        """log-probability of reaching every inner node [N, 2^depth − 1] and leaf [N, 2^depth]."""
        levels = [log_left.new_zeros(log_left.shape[0], 1)]
        for d in range(self.depth):
            nodes = slice(2**d - 1, 2 ** (d + 1) - 1)  # the 2^d nodes at depth d
            mu = levels[-1]
            levels.append(
                torch.stack((mu + log_left[:, nodes], mu + log_right[:, nodes]), 2).flatten(1)
            )
        return torch.cat(levels[:-1], dim=1), levels[-1]

    def node_probs(self, x: Tensor) -> Tensor:
        """p_i(x), the probability of the right branch at each inner node: [N, 2^depth − 1]."""
        return self._log_branches(x)[1].exp()

    def leaf_probs(self, x: Tensor) -> Tensor:
        """P^ℓ(x), the path probability of every leaf: [N, 2^depth], rows sum to 1."""
        return self._log_reach(*self._log_branches(x))[1].exp()

    def balance_penalty(self, p: Tensor, node_reach: Tensor) -> Tensor:
        """−Σ_i 2^−d(i) · ½ (log α_i + log(1 − α_i)) from p_i(x) and P^i(x), unweighted (λ = 1)."""
        alpha = (node_reach * p).sum(0) / node_reach.sum(0).clamp_min(1e-12)
        alpha = alpha.clamp(1e-6, 1 - 1e-6)
        return -(self.node_decay * 0.5 * (alpha.log() + (1 - alpha).log())).sum()

    def forward(self, x: Tensor) -> Tensor:
        log_left, log_right = self._log_branches(x)
        log_node_reach, log_leaf_reach = self._log_reach(log_left, log_right)
        self.last_penalty = self.balance_penalty(log_right.exp(), log_node_reach.exp())
        log_q = self.leaf_logits.log_softmax(-1)  # [L, C]
        # log Σ_ℓ P^ℓ(x) Q^ℓ_y
        return torch.logsumexp(log_leaf_reach.unsqueeze(-1) + log_q, dim=1)

    def pop_penalty(self) -> Tensor | None:
        """The penalty of the last forward (None if none since the last pop), then forget it:
        an expert that got no inputs this step must not contribute a stale value."""
        penalty, self.last_penalty = self.last_penalty, None
        return penalty


class TreeBalanceLoss(Regularizer):
    """Frosst & Hinton's (2017) balance penalty of the soft-tree experts, λ·Σ_trees C_tree.

    The penalty belongs to the experts, not to the router, so the model hands this
    regularizer its experts at construction (``needs_experts``: the MoE layer calls
    :meth:`attach`). Each call
    sums the penalties the trees stored in the forward pass that produced ``routing``, from
    the trees whose expert received inputs in that routing (so a stale value from an earlier
    call is never used), and clears them all. Experts that are not trees contribute nothing,
    so with no tree experts the loss is 0.
    """

    needs_experts = True

    @classmethod
    def config_problems(cls, args: Mapping[str, Any], run: Composition) -> list[str]:
        """The penalty is the trees': without soft-tree experts it would be a silent 0."""
        if run.builds_experts(SoftTreeExpert):
            return []
        model = run.targets.get("model")
        if not getattr(model, "uses_expert_config", True):
            why = f"model={run.name('model')} ignores the expert group"
        else:
            why = f"the experts are {run.name('expert')}, not trees"
        return [
            f"{run.path} (tree balance) needs soft-tree experts, but {why}; use expert=tree "
            "(or a mixed group with tree experts), or drop tree_balance"
        ]

    def __init__(self, weight: float = 0.1) -> None:
        super().__init__(weight)
        self._trees: list[tuple[int | None, nn.Module]] | None = None

    def attach(self, experts: Sequence[nn.Module] | nn.Module) -> None:
        """Remember the trees among ``experts`` (a list indexed like the router's experts, or
        one module), without registering them as submodules: they belong to the model."""
        roots = [experts] if isinstance(experts, nn.Module) else list(experts)
        indexed = not isinstance(experts, nn.Module)
        self._trees = [
            (i if indexed else None, m)
            for i, root in enumerate(roots)
            for m in root.modules()
            if hasattr(m, "pop_penalty")
        ]
        if not self._trees:
            warnings.warn(
                "regularizer tree_balance has no soft-tree experts to regularize (use "
                "expert=tree); it adds nothing",
                stacklevel=2,
            )

    def forward(self, routing: Routing) -> Tensor:
        if self._trees is None:
            raise RuntimeError(
                "TreeBalanceLoss needs the experts: call attach(experts) when building the model"
            )
        total = routing.logits.new_zeros(())
        load = routing.load() if any(i is not None for i, _ in self._trees) else None
        for i, tree in self._trees:
            penalty = tree.pop_penalty()
            if penalty is not None and (i is None or load[i] > 0):
                total = total + penalty
        return total


# -- heterogeneous mixtures ----------------------------------------------------------------
