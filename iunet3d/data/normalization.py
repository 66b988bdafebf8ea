"""CT intensity normalisation that does not depend on the patch.

Per-patch percentiles would map the same tissue to different values in different patches. CT has an
absolute scale (HU), so we use either a fixed HU window or the dataset's foreground statistics, which the
store computes at conversion (nnU-Net's CT scheme: clip to the foreground 0.5th/99.5th percentiles,
subtract the foreground mean, divide by the foreground std).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from iunet3d.data.errors import DataError

MODES = ("dataset", "window")


@dataclass(frozen=True)
class CTNormalization:
    """``(clip(hu, low, high) - center) / scale`` as float32; build it with ``window`` or ``from_dataset``."""

    mode: str
    low: float
    high: float
    center: float
    scale: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"normalization mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        values = (self.low, self.high, self.center, self.scale)
        if not all(math.isfinite(v) for v in values) or self.low >= self.high or self.scale <= 0:
            raise DataError(
                f"normalization: expected finite low < high and scale > 0, got low={self.low}, high={self.high}, "
                f"scale={self.scale}"
            )

    @classmethod
    def window(cls, low: float = -1000.0, high: float = 1000.0) -> CTNormalization:
        """Clip to the HU window ``[low, high]`` and map it linearly onto ``[-1, 1]``."""
        low, high = float(low), float(high)
        if not low < high:
            raise DataError(f"normalization window: expected low < high HU, got [{low}, {high}]")
        return cls("window", low, high, (low + high) / 2, (high - low) / 2)

    @classmethod
    def from_statistics(cls, statistics: dict, source: str = "dataset") -> CTNormalization:
        """nnU-Net CT scheme from a dataset's ``statistics["foreground_intensity"]``."""
        foreground = (statistics or {}).get("foreground_intensity")
        if not foreground:
            raise DataError(
                f"{source}: no foreground intensity statistics (does it have labels?); "
                "use a fixed HU window instead (normalization mode 'window')"
            )
        try:
            low, high = float(foreground["percentile_00_5"]), float(foreground["percentile_99_5"])
            mean, std = float(foreground["mean"]), float(foreground["std"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{source}: malformed foreground intensity statistics ({error})") from error
        if not low < high:  # a constant foreground: widen so the clip keeps a usable range
            low, high = low - 1.0, high + 1.0
        return cls("dataset", low, high, mean, max(std, 1e-3))

    @classmethod
    def from_dataset(cls, dataset) -> CTNormalization:
        """From an opened ``CTDataset``'s root statistics."""
        return cls.from_statistics(dataset.statistics, str(dataset.path))

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """float32 array of the shape of ``hu`` (any integer or float HU array)."""
        out = np.clip(hu.astype(np.float32), self.low, self.high)
        out -= np.float32(self.center)
        out *= np.float32(1.0 / self.scale)
        return out

    def to_dict(self) -> dict:
        return asdict(self)
