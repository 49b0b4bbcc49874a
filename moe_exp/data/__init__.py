"""Datamodules for the dataset axis (``data=``): Lightning's datamodule hooks, in plain classes
(no Lightning import), so a config is checked without importing Lightning."""
