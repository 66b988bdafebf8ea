"""Helpers shared by the tests: tensors, stored cases, tiny training runs, W&B offline records."""
