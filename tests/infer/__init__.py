"""Tests of iunet3d.infer."""
