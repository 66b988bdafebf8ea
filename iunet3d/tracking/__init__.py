"""Experiment tracking: the metric logger interface and its Weights & Biases run, dashboard panels and tables.

``wandb`` is imported only inside this package, and lazily (inside the functions that talk to W&B), so that
importing the trainer, the config or the CLI stays light and works where W&B is not wanted.
"""
