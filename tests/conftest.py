"""Fixtures for every test (helpers live in ``tests.helpers``)."""

import sys

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


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No credentials and no W&B environment of the caller; quiet and light (no system stats, metadata or git);
    yields the temporary home directory, which holds W&B's config, cache and staging area (``wandb-data``)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR",
                 "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_SERVICE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for name, folder in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                         ("WANDB_DATA_DIR", "wandb-data")):  # fmt: skip
        monkeypatch.setenv(name, str(home / folder))
    for name in ("WANDB_SILENT", "WANDB__DISABLE_STATS", "WANDB__DISABLE_META", "WANDB_DISABLE_GIT"):
        monkeypatch.setenv(name, "true")
    yield home
    if "wandb" in sys.modules:  # in-process runs: stop wandb-core so that files are complete and nothing leaks
        sys.modules["wandb"].teardown()
