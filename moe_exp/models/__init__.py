"""Classifiers built from the MoE library: the mixture, the V-MoE and the dense baselines."""

from moe_exp.models.dense import DenseBaseline, match_width
from moe_exp.models.mixture import GateEncoder, MixtureClassifier
from moe_exp.models.vmoe import VisionMoE

__all__ = ["DenseBaseline", "GateEncoder", "MixtureClassifier", "VisionMoE", "match_width"]
