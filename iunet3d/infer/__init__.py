"""Sliding-window prediction of whole volumes (in memory, or streamed through Zarr)."""
