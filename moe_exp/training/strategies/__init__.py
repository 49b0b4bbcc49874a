"""Training strategies (the ``strategy=`` axis), one per file: joint, hierarchical, EM."""

from moe_exp.training.strategies.em import EMStrategy, em_posteriors
from moe_exp.training.strategies.hierarchical import HierarchicalStrategy
from moe_exp.training.strategies.joint import JointStrategy
from moe_exp.training.strategies.partition import Partition
from moe_exp.training.strategies.staged import Stage, StagedStrategy, stage_parameters

__all__ = [
    "EMStrategy",
    "HierarchicalStrategy",
    "JointStrategy",
    "Partition",
    "Stage",
    "StagedStrategy",
    "em_posteriors",
    "stage_parameters",
]
