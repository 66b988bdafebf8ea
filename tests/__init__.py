"""The iunet3d test suite: one folder per package folder, shared helpers in tests.helpers."""
