"""A plan written as a commented TOML config that ``iunet3d train --config FILE`` runs as it is.

Every chosen value carries its reason as a comment on its line; the header records the dataset, the
budget, the predicted peak and how to check it (``iunet3d plan --check FILE``). Budget and prediction are
also kept in machine-readable header lines (``# plan: budget_bytes = N``, ``# plan: predicted_bytes = N``)
that ``--check`` reads (``check.read_budget``).
"""

from __future__ import annotations

from iunet3d.plan.planner import Plan
from iunet3d.train.toml_config import to_dict, toml_value


def plan_toml(plan: Plan, command: str, notes: list[str] | None = None) -> str:
    """The TOML text of ``plan`` (``command``: how it was made, recorded in the header)."""
    config = plan.config
    lines = [
        f"# Planned by `{command}`",
        f"# dataset {config.data.dataset}: median case {' x '.join(map(str, plan.median_shape))} voxels at the "
        "target spacing",
        f"# memory budget {plan.budget_bytes / 2**30:.2f} GB per device; predicted peak "
        f"{plan.predicted_peak_bytes / 2**30:.2f} GB ({plan.predicted_peak_bytes / plan.budget_bytes:.0%})",
        "# measure it: iunet3d plan --check THIS_FILE",
        *(f"# {note}" for note in notes or []),
        f"# plan: budget_bytes = {plan.budget_bytes}",
        f"# plan: predicted_bytes = {round(plan.predicted_peak_bytes)}",
        "",
    ]
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            line = f"{key} = {toml_value(value)}"
            reason = plan.reasons.get(f"{section}.{key}")
            lines.append(f"{line:<40} # {reason}" if reason else line)
        lines.append("")
    return "\n".join(lines)
