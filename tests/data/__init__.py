"""Tests of iunet3d.data."""
