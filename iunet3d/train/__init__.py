"""Training: DDP loop, checkpoints, configuration, logging."""
