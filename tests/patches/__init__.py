"""Tests of iunet3d.patches."""
