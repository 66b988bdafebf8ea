"""Dataset-wide statistics that planning and CT normalisation need (nnU-Net style).

Intensity statistics come from foreground voxels pooled over all cases (a uniform sample of up to
10k per case, drawn at conversion), so normalising with them does not depend on the patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _per_axis(values: np.ndarray, q: float) -> list[float]:
    return [float(v) for v in np.percentile(values, q, axis=0)]


def spacing_statistics(spacings: Sequence[Sequence[float]]) -> dict:
    """Per-axis (z, y, x) median, 10th/90th percentile, min and max voxel spacing in mm."""
    values = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    return {
        "median": _per_axis(values, 50),
        "percentile_10": _per_axis(values, 10),
        "percentile_90": _per_axis(values, 90),
        "min": _per_axis(values, 0),
        "max": _per_axis(values, 100),
    }


def intensity_statistics(samples: Sequence[np.ndarray]) -> dict | None:
    """Mean, std, median, 0.5th/99.5th percentiles, min, max of pooled foreground intensities (HU)."""
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.zeros(0)
    if pooled.size == 0:
        return None
    p005, p50, p995 = np.percentile(pooled, [0.5, 50, 99.5])
    return {
        "mean": float(pooled.mean()),
        "std": float(pooled.std()),
        "median": float(p50),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
        "min": float(pooled.min()),
        "max": float(pooled.max()),
        "samples": int(pooled.size),
    }
