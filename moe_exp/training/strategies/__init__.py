"""Training strategies (the ``strategy=`` axis), one per file: joint, hierarchical, EM."""

from moe_exp.training.strategies.em import EMStrategy as EMStrategy
from moe_exp.training.strategies.em import em_posteriors as em_posteriors
from moe_exp.training.strategies.hierarchical import HierarchicalStrategy as HierarchicalStrategy
from moe_exp.training.strategies.joint import JointStrategy as JointStrategy
from moe_exp.training.strategies.partition import Partition as Partition
from moe_exp.training.strategies.staged import Stage as Stage
from moe_exp.training.strategies.staged import StagedStrategy as StagedStrategy
from moe_exp.training.strategies.staged import stage_parameters as stage_parameters
