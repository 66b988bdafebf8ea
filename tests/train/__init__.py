"""Tests of iunet3d.train."""
