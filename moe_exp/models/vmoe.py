"""A small V-MoE (Riquelme et al. 2021): a vision transformer with MoE layers over patch tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_exp.models.mixture import count_parameters
from moe_exp.moe import MoE, Regularizer, Routing
from moe_exp.moe.experts.bank import ACTIVATIONS, MLPExpertBank
from moe_exp.moe.rules import below_minimum, require


class MoEBlock(nn.Module):
    """A pre-norm transformer block whose MLP is either dense or an MoE layer over tokens.

    The MoE variant routes every token on its own (``router`` reads the normalised token)
    to k experts of an :class:`~moe_exp.moe.experts.bank.MLPExpertBank`; ``shared_hidden`` > 0 adds
    an always-on dense MLP of that width (S shared experts of width h sum to one MLP of
    width S·h exactly).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        activation: str,
        dropout: float,
        moe: MoE | None = None,
        shared_hidden: int = 0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.moe = moe
        self.mlp = None if moe is not None else _mlp(dim, hidden, activation, dropout)
        self.shared = _mlp(dim, shared_hidden, activation, dropout) if shared_hidden else None

    def forward(self, x: Tensor) -> tuple[Tensor, Routing | None]:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(x)
        routing = None
        if self.moe is None:
            y = self.mlp(h)
        else:
            tokens = h.reshape(-1, h.shape[-1])
            y, routing = self.moe(tokens)
            if self.shared is not None:
                y = y + self.shared(tokens)
            y = y.view_as(h)
        return x + self.drop(y), routing


def _mlp(dim: int, hidden: int, activation: str, dropout: float) -> nn.Module:
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[activation]
    return nn.Sequential(nn.Linear(dim, hidden), act(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class VisionMoE(nn.Module):
    """A small V-MoE (Riquelme et al. 2021): a vision transformer over patch tokens whose
    MLP is an MoE layer in every ``moe_every``-th block (blocks moe_every−1, 2·moe_every−1,
    …; the paper's "every other layer" is moe_every=2).

    patch×patch patches → linear embedding of width ``dim`` + learned position embedding →
    ``depth`` pre-norm transformer blocks → layer norm, mean over tokens → linear head.
    Each MoE layer's experts are one :class:`~moe_exp.moe.experts.bank.MLPExpertBank` of
    ``num_experts`` MLPs dim → ``expert_hidden`` (default: the dense MLP width,
    ``mlp_ratio``·dim) → dim with ``expert_dropout`` on their hidden units (Switch
    Transformers' expert dropout; ``dropout`` is used elsewhere); its router is the
    configured gate with in_features = dim, routing each token. The ``expert`` partial of
    the config (a whole-image classifier) does not fit inside a block and is ignored.
    ``shared_experts`` adds S always-on MLP experts per MoE layer (DeepSeekMoE), summed
    with weight 1. Returns (log-probabilities, [Routing per MoE layer]).
    """

    uses_expert_config = False  # its experts are MLP banks inside the blocks
    min_values = {"depth": 1}  # at least one transformer block

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        num_experts: int,
        expert: Callable[..., nn.Module] | None,
        router: Callable[..., nn.Module],
        regularizers: Mapping[str, Regularizer] | None = None,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        expert_hidden: int | None = None,
        moe_every: int = 2,
        activation: str = "gelu",
        dropout: float = 0.0,
        expert_dropout: float = 0.0,
        shared_experts: int = 0,
    ) -> None:
        super().__init__()
        del expert  # whole-image experts do not fit in a token MLP: the bank replaces them
        if len(in_shape) != 3:
            raise ValueError(f"model=vmoe needs images (C, H, W), got in_shape={tuple(in_shape)}")
        c, height, width = in_shape
        if not 1 <= patch <= min(height, width):
            raise ValueError(f"model.patch={patch} must be in [1, {min(height, width)}]")
        require(below_minimum(VisionMoE, {"depth": depth}))
        if not 1 <= moe_every <= depth:
            raise ValueError(
                f"model.moe_every={moe_every} must be in [1, depth={depth}] "
                "(at least one MoE block)"
            )
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is not one of {', '.join(ACTIVATIONS)}"
            )
        if shared_experts < 0:
            raise ValueError(f"model.shared_experts={shared_experts} must be >= 0")
        hidden = max(1, round(mlp_ratio * dim))
        expert_hidden = expert_hidden or hidden
        self.moe_every = moe_every
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        tokens = (height // patch) * (width // patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(depth):
            moe = None
            if (i + 1) % moe_every == 0:
                bank = MLPExpertBank(
                    num_experts, dim, expert_hidden, dim, activation, dropout=expert_dropout
                )
                moe = MoE(router(in_features=dim, num_experts=num_experts), bank, regularizers)
            blocks.append(
                MoEBlock(
                    dim,
                    heads,
                    hidden,
                    activation,
                    dropout,
                    moe=moe,
                    shared_hidden=shared_experts * expert_hidden if moe is not None else 0,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.blocks if b.moe is not None]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Routing]]:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, T, dim]
        h = self.drop(tokens + self.pos)
        routings = []
        for block in self.blocks:
            h, routing = block(h)
            if routing is not None:
                routings.append(routing)
        logits = self.head(self.norm(h).mean(1))
        return F.log_softmax(logits, dim=-1), routings

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those active for one token: all but the expert banks, plus
        k/E of each bank (the router's k; E for a dense gate)."""
        total = count_parameters(self)
        active = float(total)
        for moe in self.moe_layers:
            bank = count_parameters(moe.experts)
            active -= bank * (1 - moe.router.active_experts / moe.num_experts)
        return {"params_total": total, "params_active": round(active)}


# -- dense baselines ------------------------------------------------------------------------
