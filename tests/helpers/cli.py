"""The ``iunet3d`` command line run in the test process (the same ``main`` the console script runs)."""

import pytest

from iunet3d.cli import main


def run_cli(args, capsys) -> tuple[int, str]:
    """Run ``iunet3d ARGS`` expecting it to exit; (exit code, its stderr stripped)."""
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in args])
    return exited.value.code, capsys.readouterr().err.strip()
