"""Fixtures for every test (helpers live in ``tests.helpers``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
