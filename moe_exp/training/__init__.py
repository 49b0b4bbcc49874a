"""Training: the LightningModule, its callbacks, strategies, expert surgery, checkpoints."""
