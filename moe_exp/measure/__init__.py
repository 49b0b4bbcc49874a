"""Measurements of a model: cost (FLOPs, parameters), expert similarity, routing pictures."""
