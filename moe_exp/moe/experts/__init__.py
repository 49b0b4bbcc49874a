"""Expert networks by kind (dense, conv, tree), mixtures of kinds, and the stacked MLP bank.

Each expert takes ``(in_shape, num_outputs, ...)``, so any expert fits any mixture.
"""

from moe_exp.moe.experts.conv import CNNExpert, ResNetExpert
from moe_exp.moe.experts.dense import LinearExpert, MLPExpert, check_dropout
from moe_exp.moe.experts.kinds import build_experts, first_kind, mixed
from moe_exp.moe.experts.tree import SoftTreeExpert, TreeBalanceLoss

__all__ = [
    "CNNExpert",
    "LinearExpert",
    "MLPExpert",
    "ResNetExpert",
    "SoftTreeExpert",
    "TreeBalanceLoss",
    "build_experts",
    "check_dropout",
    "first_kind",
    "mixed",
]
