"""Tests of iunet3d.bench."""
