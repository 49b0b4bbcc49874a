"""moe-exp: a Hydra + Lightning experiment runner for Mixture-of-Experts image classification."""

__version__ = "0.1.0"
