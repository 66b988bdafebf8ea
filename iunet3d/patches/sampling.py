"""Where patches come from: a pure function from (seed, global patch index) to (case, start).

``PatchSampler.draw(index)`` derives its randomness from ``numpy.random.SeedSequence([seed, index])`` and
nothing else, so any process can produce any patch of the sequence without having produced the ones before
it. That is what makes sharding across ranks and workers disjoint and resuming exact.

nnU-Net's foreground oversampling: a ``foreground_fraction`` of patches is centred on a voxel of a class
present in the case, picked from the class-location index that conversion stored with each case (classes
chosen uniformly among those present, or by ``class_probabilities``); the others start uniformly at
random. Patches stay inside the volume where they fit; a patch larger than the volume along an axis is
placed at a random offset and padded.

With a target spacing, ``patch_size`` is in target voxels and a patch covers ``(patch_size - 1) * ratio``
source voxels between its first and last voxel centres (``ratio = target / case spacing``); ``start`` is
then the source coordinate (float) of its first voxel, and the class locations (source voxels) are mapped
through that ratio, so a foreground patch is centred on its voxel at any spacing. Along axes where the case
already has the target spacing, starts are whole voxels as without resampling (no interpolation there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from iunet3d.data.dataset import CTCase, CTDataset
from iunet3d.data.errors import DataError

LOCATION_CACHE_SIZE = 128  #: (case, class) location arrays kept per process, <= 120 kB each


@dataclass(frozen=True)
class PatchDraw:
    """One sampled patch: which case, where it starts (z, y, x; may be negative), and why."""

    index: int  #: global index in the sequence
    case: str
    start: tuple[int, int, int] | tuple[float, float, float]  #: floats with a target spacing
    foreground_class: int  #: the class the patch was centred on, 0 for a uniformly placed patch


def seeded_rng(*key: int) -> np.random.Generator:
    """A generator determined by the integers ``key`` alone (independent streams for distinct keys)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def start_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (low, high) start per axis: inside the volume, or covering it when the patch is larger."""
    shape, patch = np.asarray(shape), np.asarray(patch_size)
    return np.minimum(0, shape - patch), np.maximum(0, shape - patch)


class PatchSampler:
    """Draws patch positions from ``cases`` of a dataset.

    Args:
        dataset: the opened dataset (only its path and case list are kept, so this pickles small).
        cases: case names to draw from (default: all).
        patch_size: (D, H, W) voxels.
        foreground_fraction: probability that a patch is centred on a voxel of a present class.
        class_probabilities: optional {class value: weight} for choosing that class (renormalised over
            the classes present in the case); default uniform over present classes.
        target_spacing: (z, y, x) mm that ``patch_size`` is measured in; None: the cases' own voxels.
    """

    def __init__(
        self,
        dataset: CTDataset,
        patch_size: Sequence[int],
        seed: int = 0,
        cases: Sequence[str] | None = None,
        foreground_fraction: float = 0.33,
        class_probabilities: Mapping[int, float] | None = None,
        target_spacing: Sequence[float] | None = None,
    ):
        self.dataset_path = dataset.path
        self.cases = list(dataset.case_names if cases is None else cases)
        if not self.cases:
            raise DataError(f"{dataset.path}: no cases to draw patches from")
        known = set(dataset.case_names)  # a set: datasets may hold thousands of cases
        for name in self.cases:
            if name not in known:
                dataset.case(name)  # raises a DataError naming the dataset and its cases
        self.patch_size = check_patch_size(patch_size)
        if not 0 <= foreground_fraction <= 1:
            raise DataError(f"foreground_fraction: expected a number in [0, 1], got {foreground_fraction!r}")
        self.foreground_fraction = float(foreground_fraction)
        self.class_probabilities = _check_class_probabilities(class_probabilities, dataset.num_classes)
        self.seed = int(seed)
        self.target_spacing = None if target_spacing is None else tuple(float(t) for t in target_spacing)
        self._open: dict[str, CTCase] = {}
        self._locations: dict[tuple[str, int], np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_locations": {}}

    def case(self, name: str) -> CTCase:
        """The case, opened once per process."""
        if name not in self._open:
            self._open[name] = CTCase(self.dataset_path / name)
        return self._open[name]

    def draw(self, index: int) -> PatchDraw:
        """The patch number ``index`` of this sampler's sequence (a pure function of seed and index)."""
        rng = seeded_rng(self.seed, index)
        name = self.cases[int(rng.integers(len(self.cases)))]
        case = self.case(name)
        foreground_class = 0
        if rng.random() < self.foreground_fraction:
            foreground_class = self._choose_class(case, rng)
        centre = None
        if foreground_class:
            locations = self._class_locations(case, foreground_class)
            centre = locations[int(rng.integers(len(locations)))]
        if self.target_spacing is not None:
            return PatchDraw(index, name, self._resampled_start(case, centre, rng), foreground_class)
        low, high = start_bounds(case.shape, self.patch_size)
        if centre is not None:
            start = np.clip(centre - np.asarray(self.patch_size) // 2, low, high)
        else:
            start = rng.integers(low, high + 1)
        return PatchDraw(index, name, tuple(int(s) for s in start), foreground_class)

    def _resampled_start(self, case: CTCase, centre: np.ndarray | None, rng: np.random.Generator) -> tuple:
        """Source coordinate of the first voxel of a target-spacing patch (centred on ``centre`` if given)."""
        ratio = np.asarray(self.target_spacing) / np.asarray(case.spacing)
        extent = (np.asarray(self.patch_size) - 1) * ratio  # first to last voxel centre, source voxels
        last = np.asarray(case.shape) - 1
        low, high = np.minimum(0.0, last - extent), np.maximum(0.0, last - extent)
        native = np.isclose(ratio, 1.0, rtol=1e-6, atol=0)
        if centre is not None:
            start = np.clip(centre - np.asarray(self.patch_size) // 2 * ratio, low, high)  # voxel P // 2 on it
        else:
            start = np.array([rng.integers(round(a), round(b) + 1) if same else rng.uniform(a, b)
                              for a, b, same in zip(low, high, native, strict=True)])  # fmt: skip
        return tuple(float(round(s)) if same else float(s) for s, same in zip(start, native, strict=True))

    def _class_locations(self, case: CTCase, value: int) -> np.ndarray:
        key = (case.name, value)
        if key not in self._locations:
            if len(self._locations) >= LOCATION_CACHE_SIZE:
                self._locations.pop(next(iter(self._locations)))  # oldest first
            self._locations[key] = case.class_locations(value)
        return self._locations[key]

    def _choose_class(self, case: CTCase, rng: np.random.Generator) -> int:
        present = sorted(value for value, count in case.class_voxel_counts().items() if count > 0)
        if self.class_probabilities is not None:
            present = [v for v in present if self.class_probabilities.get(v, 0.0) > 0]
        if not present:
            return 0
        if self.class_probabilities is None:
            return present[int(rng.integers(len(present)))]
        weights = np.array([self.class_probabilities[v] for v in present])
        return present[int(rng.choice(len(present), p=weights / weights.sum()))]


def check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank {rank!r} / world_size {world_size!r}: expected 0 <= rank < world_size")


def check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(patch_size)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
        raise DataError(f"patch_size: expected three positive integers (D, H, W), got {patch_size!r}")
    return tuple(int(v) for v in values)


def _check_class_probabilities(probabilities: Mapping[int, float] | None, num_classes: int) -> dict | None:
    if probabilities is None:
        return None
    checked = {}
    for value, weight in dict(probabilities).items():
        if not isinstance(value, (int, np.integer)) or not 1 <= value < num_classes:
            raise DataError(f"class_probabilities: class {value!r} is not a foreground class 1..{num_classes - 1}")
        if not isinstance(weight, (int, float)) or not weight >= 0:
            raise DataError(f"class_probabilities[{value}]: expected a weight >= 0, got {weight!r}")
        checked[int(value)] = float(weight)
    if not any(checked.values()):
        raise DataError("class_probabilities: at least one class needs a positive weight")
    return checked


def split_cases(case_names: Sequence[str], validation: int | float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministically hold out cases: ``validation`` is a count (int) or a fraction (float < 1).

    Returns (training cases, validation cases), each in the dataset's order.
    """
    names = list(case_names)
    count = round(validation * len(names)) if isinstance(validation, float) else int(validation)
    if isinstance(validation, float) and not 0 <= validation < 1:
        raise DataError(f"validation fraction: expected 0 <= fraction < 1, got {validation}")
    if not 0 <= count < len(names):
        raise DataError(f"validation cases: expected 0..{len(names) - 1} of {len(names)} cases, got {validation}")
    held_out = set(seeded_rng(seed, len(names)).permutation(len(names))[:count].tolist())
    return [n for i, n in enumerate(names) if i not in held_out], [n for i, n in enumerate(names) if i in held_out]
