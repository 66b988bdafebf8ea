"""Tests of iunet3d.models."""
