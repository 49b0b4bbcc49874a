"""A Mixture-of-Experts library in plain PyTorch (no Hydra or Lightning imports).

>>> from moe_exp.moe import MoE, NoisyTopKGate, MLPExpert
>>> layer = MoE(NoisyTopKGate(16, 4, k=2), [MLPExpert((16,), 8) for _ in range(4)])
"""

from moe_exp.moe.balance import (
    ImportanceLoss,
    LoadLoss,
    Regularizer,
    SwitchLoss,
    cv_squared,
    importance_loss,
    load_loss,
    switch_loss,
)
from moe_exp.moe.experts import CNNExpert, MLPExpert
from moe_exp.moe.gates import NoisyTopKGate, Router, SoftmaxGate, TopKGate
from moe_exp.moe.layer import MoE, dispatch_combine
from moe_exp.moe.routing import Routing
from moe_exp.moe.stats import RoutingStats, balance_metrics

__all__ = [
    "CNNExpert",
    "ImportanceLoss",
    "LoadLoss",
    "MLPExpert",
    "MoE",
    "NoisyTopKGate",
    "Regularizer",
    "Router",
    "Routing",
    "RoutingStats",
    "SoftmaxGate",
    "SwitchLoss",
    "TopKGate",
    "balance_metrics",
    "cv_squared",
    "dispatch_combine",
    "importance_loss",
    "load_loss",
    "switch_loss",
]
