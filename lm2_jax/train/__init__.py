"""Training: losses (the optimizer, steps, trainer and checkpoints arrive with the trainer issue)."""
