"""Training: loss, optimizer, sharded train/eval steps and the loop (trainer), Orbax checkpoints."""
