"""A fixed set of validation patches from held-out cases, the same at every validation and on every run.

Per case, ``patches_per_case`` patches are drawn once (no augmentation), a ``foreground_fraction`` of them
centred on voxels of present classes, from a seed keyed by the case's name. The list is split across ranks
(item ``i`` goes to rank ``i % world_size``), so the ranks together see each patch exactly once.
Whole-volume validation replaces this once sliding-window inference exists.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from iunet3d.data.dataset import CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.resampling import dataset_target_spacing
from iunet3d.patches.patch_stream import PatchCropper, check_labelled
from iunet3d.patches.sampling import PatchDraw, PatchSampler, check_rank


class ValidationPatches(Dataset):
    """Map-style dataset of this rank's validation patches; items are dicts like ``PatchStream``'s.

    Args:
        dataset: a ``CTDataset`` or its path.
        cases: the held-out case names.
        patch_size: (D, H, W).
        patches_per_case: patches drawn from each case.
        foreground_fraction: share of them centred on a voxel of a present class.
        rank, world_size: this rank's share.
        seed: validation seed (independent of the training seed).
        normalization: default ``CTNormalization.from_dataset``.
        target_spacing, image_interpolation, label_interpolation: as for ``PatchStream``.
    """

    def __init__(
        self,
        dataset: CTDataset | Path | str,
        *,
        cases: Sequence[str],
        patch_size: Sequence[int],
        patches_per_case: int = 4,
        foreground_fraction: float = 0.5,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        normalization: CTNormalization | None = None,
        target_spacing: str | Sequence[float] = "native",
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
    ):
        dataset = open_dataset(dataset)
        self.target_spacing = dataset_target_spacing(dataset, target_spacing)
        if not cases:
            raise DataError(f"{dataset.path}: no validation cases given")
        if not isinstance(patches_per_case, int) or patches_per_case < 1:
            raise DataError(f"patches_per_case: expected a positive integer, got {patches_per_case!r}")
        check_rank(rank, world_size)
        check_labelled(dataset, cases)
        spacing = self.target_spacing
        self.sampler = PatchSampler(dataset, patch_size, seed, cases, target_spacing=spacing)  # opens cases per process
        self.draws: list[PatchDraw] = []  # every rank's, in order
        for name in cases:
            case_seed = zlib.crc32(name.encode())  # stable across runs and Python versions
            per_case = PatchSampler(dataset, patch_size, seed * 2**32 + case_seed, [name], foreground_fraction,
                                    target_spacing=spacing)  # fmt: skip
            self.draws += [per_case.draw(k) for k in range(patches_per_case)]
        self.rank, self.world_size = rank, world_size
        self.rank_draws = self.draws[rank::world_size]
        self.crop = PatchCropper(self.sampler.patch_size, normalization or CTNormalization.from_dataset(dataset),
                                 None, None, spacing, image_interpolation, label_interpolation)  # fmt: skip

    def __len__(self) -> int:
        return len(self.rank_draws)

    def __getitem__(self, item: int) -> dict:
        draw = self.rank_draws[item]
        image, label = self.crop(self.sampler.case(draw.case), draw.start, seed=None)
        return {
            "image": image,
            "label": label,
            "case": draw.case,
            "location": torch.tensor(np.floor(draw.start), dtype=torch.int64),
            "index": item * self.world_size + self.rank,  # position in ``draws``
        }
