"""``iunet3d plan --check FILE``: measure a training config's real peak memory and step time against its budget."""

from __future__ import annotations

import re
from pathlib import Path

#: The budget line a plan writes into its TOML: ``# plan: budget_bytes = N``.
BUDGET_PATTERN = re.compile(r"^#\s*plan:\s*budget_bytes\s*=\s*(\d+)\s*$", re.MULTILINE)
PREDICTED_PATTERN = re.compile(r"^#\s*plan:\s*predicted_bytes\s*=\s*(\d+)\s*$", re.MULTILINE)


def read_budget(path: Path | str) -> int | None:
    """The ``# plan: budget_bytes = N`` comment of a planned config (bytes), or None."""
    match = BUDGET_PATTERN.search(Path(path).read_text())
    return int(match.group(1)) if match else None


def read_predicted(path: Path | str) -> int | None:
    """The ``# plan: predicted_bytes = N`` comment of a planned config (bytes), or None."""
    match = PREDICTED_PATTERN.search(Path(path).read_text())
    return int(match.group(1)) if match else None


def check_config(
    path: Path | str,
    device: str = "cpu",
    budget_bytes: int | None = None,
    steps: int = 3,
    predicted_bytes: int | None = None,
    use_dataset: bool = True,
) -> str:
    """Measure the config in ``path`` (TOML) for ``steps`` training steps on ``device`` in a fresh process
    and return a small table: measured peak (MB), baseline, step time, budget and the headroom (budget -
    peak) with a verdict. Raises ``ProbeError`` (one line) if the probe fails, e.g. out of memory."""
    from iunet3d.plan.probe import describe, measure_training
    from iunet3d.train.config import load_training_config

    config = load_training_config(path)
    measurement = measure_training(config, device, steps=steps, use_dataset=use_dataset)
    mb = 2**20
    rows = [
        ("config", f"{path}: {describe(config, device)}"),
        ("measured peak", f"{measurement.peak_bytes / mb:.0f} MB"
         + (" (torch.cuda.max_memory_allocated)" if device.startswith("cuda")
            else f" (summed RSS of {measurement.processes} processes)")),
        ("baseline", f"{measurement.baseline_bytes / mb:.0f} MB (after building, before the first step)"),
        ("step time", f"{measurement.step_seconds:.3f} s (median of steps 2..{steps})"),
    ]  # fmt: skip
    if measurement.reserved_bytes is not None:
        rows.append(("reserved", f"{measurement.reserved_bytes / mb:.0f} MB (torch.cuda.max_memory_reserved)"))
    if predicted_bytes is not None:
        error = 100 * (predicted_bytes - measurement.peak_bytes) / measurement.peak_bytes
        rows.append(("predicted peak", f"{predicted_bytes / mb:.0f} MB ({error:+.1f}% vs measured)"))
    if budget_bytes is not None:
        headroom = budget_bytes - measurement.peak_bytes
        verdict = "fits" if headroom >= 0 else "EXCEEDS the budget"
        rows.append(("budget", f"{budget_bytes / mb:.0f} MB: {verdict}, headroom {headroom / mb:+.0f} MB "
                               f"({100 * measurement.peak_bytes / budget_bytes:.0f}% used)"))  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
