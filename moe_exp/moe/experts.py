"""Expert networks. Each takes ``(in_shape, num_outputs, ...)`` so any expert fits any mixture.

``in_shape`` is the per-sample input shape, (C, H, W) for images or (D,) for features. The
convolutional experts read a feature vector as a one-row, one-channel image; the others
flatten whatever they get.

Every expert has ``dropout``, applied inside the expert (after each hidden layer; on the input
of experts without hidden layers). Switch Transformers (Fedus et al. 2021, sec. 2.4) found a
higher dropout inside experts than elsewhere ("expert dropout") helps when fine-tuning.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.moe.balance import Regularizer
from moe_exp.moe.routing import Routing


def check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def _image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) for an image, (1, 1, D) for a feature vector (a one-row image)."""
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) == 3:
        return in_shape  # type: ignore[return-value]
    if len(in_shape) == 2:
        return (1, *in_shape)
    if len(in_shape) == 1:
        return (1, 1, in_shape[0])
    raise ValueError(f"in_shape must be (C, H, W), (H, W) or (D,), got {in_shape}")


class LinearExpert(nn.Module):
    """A linear classifier on the flattened input; dropout (no hidden layer) on its input."""

    def __init__(self, in_shape: Sequence[int], num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(check_dropout(dropout)),
            nn.Linear(math.prod(in_shape), num_outputs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPExpert(nn.Module):
    """Flatten, then ``depth`` hidden layers of ReLU units (each followed by dropout), then a
    linear read-out."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        hidden: int = 128,
        depth: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of batch, group, none")


class _PooledConvExpert(nn.Module):
    """Conv features → global average pool → dropout → linear read-out; flat inputs are
    reshaped to the image shape first."""

    image_shape: tuple[int, int, int]

    def finish(
        self, layers: list[nn.Module], channels: int, num_outputs: int, dropout: float
    ) -> None:
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            x = x.reshape(x.shape[0], *self.image_shape)
        return self.head(self.features(x))


class CNNExpert(_PooledConvExpert):
    """A small CNN classifier: three 3×3 conv stages (the first two stride 2), global pooling.

    Strided convolutions keep it cheap (~1 M multiply-adds on 32×32 at width 16), so a
    mixture of several stays fast on a CPU. Dropout follows every conv stage and precedes
    the read-out.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        self.image_shape = _image_shape(in_shape)
        channels = self.image_shape[0]
        widths = (width, 2 * width, 2 * width)
        strides = (2, 2, 1)
        layers: list[nn.Module] = []
        for w, s in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(channels, w, 3, stride=s, padding=1, bias=norm == "none"),
                _norm(norm, w),
                nn.ReLU(),
                nn.Dropout(dropout),
            ]
            channels = w
        self.finish(layers, channels, num_outputs, dropout)


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (He et al. 2016, "Deep residual learning");
    a strided 1×1 projection on the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dropout: float) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(norm, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.norm1(self.conv1(x)).relu())
        return (self.norm2(self.conv2(h)) + self.shortcut(x)).relu()


class ResNetExpert(_PooledConvExpert):
    """A small residual CNN: a strided 3×3 stem, then stages of basic blocks at widths
    (w, 2w, 4w), each later stage halving the resolution; global pooling and a linear read-out.

    At the defaults (width 16, one block per stage) it costs ~3 M multiply-adds on a 32×32
    image, a few times the :class:`CNNExpert`. Dropout sits inside every block and before
    the read-out.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of counts >= 1, got {blocks}")
        self.image_shape = _image_shape(in_shape)
        layers: list[nn.Module] = [
            nn.Conv2d(self.image_shape[0], width, 3, stride=2, padding=1, bias=norm == "none"),
            _norm(norm, width),
            nn.ReLU(),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(channels, c_out, stride, norm, dropout))
                channels = c_out
        self.finish(layers, channels, num_outputs, dropout)


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

    def __init__(
        self,
        in_shape: Sequence[int],
        num_outputs: int,
        depth: int = 4,
        beta: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"tree depth must be >= 1, got {depth}")
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


def mixed(
    in_shape: Sequence[int], num_outputs: int, groups: Sequence[Mapping[str, Any]]
) -> list[nn.Module]:
    """Several kinds of expert in one mixture, e.g. 2 CNNs + 2 MLPs.

    ``groups`` is a list of ``{"count": n, "expert": partial}``; the experts are built in
    that order (so expert ids 0..n₀−1 are the first kind, and so on). Returns the whole
    list; :func:`build_experts` checks its length against the mixture's expert count.
    """
    if not groups:
        raise ValueError("expert=mixed needs at least one group of {count, expert}")
    experts: list[nn.Module] = []
    for i, group in enumerate(groups):
        if set(group) != {"count", "expert"}:
            raise ValueError(
                f"expert.groups[{i}] must have exactly the keys count and expert, "
                f"got {sorted(group)}"
            )
        count = int(group["count"])
        if count < 0:
            raise ValueError(f"expert.groups[{i}].count={count} must be >= 0")
        experts += [
            group["expert"](in_shape=tuple(in_shape), num_outputs=num_outputs) for _ in range(count)
        ]
    return experts


def _is_mixed(factory: Callable[..., Any]) -> bool:
    return isinstance(factory, functools.partial) and factory.func is mixed


def build_experts(
    factory: Callable[..., nn.Module | Sequence[nn.Module]],
    count: int,
    in_shape: Sequence[int],
    num_outputs: int,
) -> list[nn.Module]:
    """``count`` experts from an expert partial; a :func:`mixed` partial builds them all at
    once and must build exactly ``count`` (ValueError otherwise)."""
    if _is_mixed(factory):
        experts = list(factory(in_shape=tuple(in_shape), num_outputs=num_outputs))
        if len(experts) != count:
            kinds = ", ".join(
                f"{g['count']}×{getattr(g['expert'], 'func', g['expert']).__name__}"
                for g in factory.keywords["groups"]
            )
            raise ValueError(
                f"expert=mixed builds {len(experts)} experts ({kinds}) but experts={count}: "
                "make the counts in expert.groups sum to experts"
            )
        return experts
    return [factory(in_shape=tuple(in_shape), num_outputs=num_outputs) for _ in range(count)]


def first_kind(factory: Callable[..., Any]) -> Callable[..., nn.Module]:
    """The single-expert partial of a factory: itself, or a mixed factory's first group's."""
    if _is_mixed(factory):
        return factory.keywords["groups"][0]["expert"]
    return factory
