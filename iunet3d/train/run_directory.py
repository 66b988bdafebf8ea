"""A run's directory: its resolved config, its identity (W&B run id, git revision) and its summary.

<run dir>/config.toml       the resolved config of the latest start (every override applied), written once the
                            start is accepted: a resume whose config differs from its checkpoint's in a key
                            outside ``config.RESUME_MAY_CHANGE`` is refused before anything is written
<run dir>/run.json          W&B run id and git revision, written at the first start, kept on restarts
<run dir>/summary.json      final metrics, written when the run completes
<run dir>/checkpoints/      step-<N>.pt (see checkpoint.py)
<run dir>/wandb/            the W&B run files (offline runs: offline-run-*)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from iunet3d.data.staging import write_text_atomically
from iunet3d.tracking.wandb_run import generate_run_id
from iunet3d.train.toml_config import to_toml


def git_revision() -> str | None:
    """The commit of the iunet3d source tree (with ``-dirty`` if it has changes), or None."""
    source = Path(__file__).resolve().parents[2]
    try:
        revision = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty", "--abbrev=40"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return revision or None


def prepare_run_directory(run_dir: Path, config) -> dict:
    """Create the run directory (main rank only), save the resolved config, return the run identity.

    Call it only once the start is accepted (for a resume: once its config has been checked against the
    checkpoint's), so that a refused start leaves the directory as it was.

    The identity (``wandb_id``, ``git_revision``) is created at the first start and reused afterwards,
    so a run restarted before its first checkpoint still continues the same W&B run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run_dir / "config.toml", to_toml(config))
    identity_path = run_dir / "run.json"
    if identity_path.exists():
        try:
            identity = json.loads(identity_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{identity_path}: not valid JSON ({error}); delete it to start a new W&B run") from None
    else:
        identity = {"wandb_id": generate_run_id(), "git_revision": git_revision()}
        write_text_atomically(identity_path, json.dumps(identity, indent=2) + "\n")
    return identity


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    write_text_atomically(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path
