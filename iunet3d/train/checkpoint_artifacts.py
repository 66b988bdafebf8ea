"""Which checkpoints become W&B model artifacts, under which name and aliases, with which metadata (no W&B here).

One artifact per training run, ``model-<run id>``: every logged checkpoint is a new version of it, with the
alias ``step-<N>`` and, where they apply, ``best`` (its validation ``val/dice_mean`` beats every earlier one) and
``last`` (the final checkpoint of the run); W&B moves an alias to the newest version that claims it. The policy is
``wandb.log_checkpoints`` (see ``WandbConfig``).
"""

from __future__ import annotations

import math

#: The checkpoint state entries copied into the artifact's metadata (what ``iunet3d predict`` needs to know
#: about a model without downloading it).
METADATA_KEYS = ("step", "config", "class_names", "normalization", "network", "patch_size", "target_spacing",
                 "git_revision")  # fmt: skip


def artifact_name(run_id: str) -> str:
    """The model artifact of training run ``run_id`` (its W&B id): all its checkpoints are versions of it."""
    return f"model-{run_id}"


def artifact_reference(run_id: str, step: int) -> str:
    """The reference of the version that holds the checkpoint of ``step``, for ``use_artifact``."""
    return f"{artifact_name(run_id)}:step-{step}"


def checkpoint_aliases(policy: str, step: int, is_final: bool, is_new_best: bool) -> list[str] | None:
    """The aliases of the checkpoint of ``step`` under ``policy``, or None when it is not logged.

    ``is_final``: the run's last checkpoint (step == train.steps); ``is_new_best``: validated at ``step`` with a
    ``val/dice_mean`` higher than every earlier validation of the run.
    """
    if policy == "none":
        return None
    if policy == "best":
        logged = is_new_best or is_final
    elif policy == "last":
        logged = is_final
    elif policy == "all":
        logged = True
    else:
        raise ValueError(f"wandb.log_checkpoints: expected best, last, all or none, got {policy!r}")
    if not logged:
        return None
    return [f"step-{step}", *(["best"] if is_new_best else []), *(["last"] if is_final else [])]


def checkpoint_metadata(state: dict, metrics: dict[str, float] | None = None) -> dict:
    """The artifact metadata of a checkpoint ``state`` (the dict ``Trainer.save_checkpoint`` writes): its step,
    config, class names, normalization, network keyword arguments, patch size, target spacing and git revision,
    plus ``metrics`` (``val/dice_mean``, ``val/dice/<class>``) when the checkpoint's step was validated.

    Non-finite numbers (a class absent from labels and predictions has a NaN Dice) become None: metadata is JSON.
    """
    metadata = {key: _json_safe(state.get(key)) for key in METADATA_KEYS}
    if metrics:
        metadata.update({key: _json_safe(value) for key, value in metrics.items()})
    return metadata


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
