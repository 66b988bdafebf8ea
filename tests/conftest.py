"""Fixtures for every test (helpers live in ``tests.helpers``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _wandb_files_in_a_temporary_directory(tmp_path_factory):
    """W&B's staging, cache and config directories (default: under the home directory) for every test and every
    process a test starts: logged tables and checkpoint artifacts are copied there until uploaded."""
    import os

    root = tmp_path_factory.mktemp("wandb-home")
    names = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(root / folder) for name, folder in names.items()})
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
