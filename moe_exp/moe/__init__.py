"""A Mixture-of-Experts library in plain PyTorch (no Hydra or Lightning imports).

>>> from moe_exp.moe import MoE, NoisyTopKGate, MLPExpert
>>> layer = MoE(NoisyTopKGate(16, 4, k=2), [MLPExpert((16,), 8) for _ in range(4)])
"""

from moe_exp.moe import gates
from moe_exp.moe.balance import (
    GateEntropyLoss,
    ImportanceLoss,
    LoadEntropyLoss,
    LoadLoss,
    Regularizer,
    SwitchLoss,
    ZLoss,
    cv_squared,
    gate_entropy_loss,
    importance_loss,
    load_entropy_loss,
    load_loss,
    switch_loss,
    z_loss,
)
from moe_exp.moe.experts import (
    CNNExpert,
    LinearExpert,
    MLPExpert,
    ResNetExpert,
    SoftTreeExpert,
    TreeBalanceLoss,
    mixed,
)
from moe_exp.moe.experts.bank import MLPExpertBank
from moe_exp.moe.gates import *  # noqa: F403  (every gate, by its class name)
from moe_exp.moe.layer import MoE, dispatch_combine, soft_dispatch_combine
from moe_exp.moe.routing import Routing, expert_capacity, limit_capacity
from moe_exp.moe.stats import RoutingStats, balance_metrics

__all__ = [
    *gates.__all__,
    "CNNExpert",
    "GateEntropyLoss",
    "ImportanceLoss",
    "LinearExpert",
    "LoadEntropyLoss",
    "LoadLoss",
    "MLPExpert",
    "MLPExpertBank",
    "MoE",
    "Regularizer",
    "ResNetExpert",
    "Routing",
    "RoutingStats",
    "SoftTreeExpert",
    "SwitchLoss",
    "TreeBalanceLoss",
    "ZLoss",
    "balance_metrics",
    "cv_squared",
    "dispatch_combine",
    "expert_capacity",
    "gate_entropy_loss",
    "importance_loss",
    "limit_capacity",
    "load_entropy_loss",
    "load_loss",
    "mixed",
    "soft_dispatch_combine",
    "switch_loss",
    "z_loss",
]
