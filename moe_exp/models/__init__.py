"""Classifiers built from the MoE library: the mixture, the V-MoE and the dense baselines."""

from moe_exp.models.dense import DenseBaseline as DenseBaseline
from moe_exp.models.dense import match_width as match_width
from moe_exp.models.mixture import GateEncoder as GateEncoder
from moe_exp.models.mixture import MixtureClassifier as MixtureClassifier
from moe_exp.models.vmoe import VisionMoE as VisionMoE
