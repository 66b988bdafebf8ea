"""Benchmarks that print tables: every ratio is measured side by side in one run."""
