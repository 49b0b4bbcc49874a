"""The command-line app: Hydra entry points, config checks, one run top to bottom, its record."""
