"""``PatchStream``: an endless, sharded, resumable stream of augmented training patches read from Zarr.

The stream of one rank is the sequence of positions 0, 1, 2, ...; position ``p`` of rank ``r`` is the
global patch ``p * world_size + r`` of the sampler's sequence (``sampling.PatchSampler``), a pure function
of the seed and that index. DataLoader workers split a rank's positions into blocks of ``block_size``
(the DataLoader's batch size) and take every ``num_workers``-th block, which is exactly the order in which
the DataLoader hands batches out. Hence:

- no patch index is produced twice, across ranks or workers;
- a rank receives the same patches in the same order whatever its number of workers;
- resuming after ``n`` patches only needs ``n`` (``state_dict``/``load_state_dict``, or ``start_at``).

Per patch: read the region plus an augmentation margin (only the chunks it touches), normalise its HU,
wrap it in a TorchIO ``Subject``, augment, crop the patch from the centre. With a target spacing the
region is first interpolated onto the target grid together with the affine augmentation, in one step
(``patch_resampling``); the remaining transforms run on that region as they would natively.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.data.dataset import CTCase, CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.resampling import check_interpolation, dataset_target_spacing
from iunet3d.host_memory import release_free_memory
from iunet3d.patches.augmentation import AugmentationConfig, augmentation_margin
from iunet3d.patches.patch_resampling import (
    IMAGE_INTERPOLATIONS,
    LABEL_INTERPOLATIONS,
    affine_matrix,
    patch_grid,
    read_patch,
)
from iunet3d.patches.sampling import PatchSampler, check_rank, seeded_rng

DEFAULT_AUGMENTATION = AugmentationConfig()
AUGMENTATION_SEED_STREAM = 1  # separates the augmentation's random numbers from the sampler's draws


def check_labelled(dataset: CTDataset, cases: Sequence[str]) -> None:
    """Training and validation patches need labels: fail naming the first case without one."""
    labels = {entry["name"]: entry.get("labels") for entry in dataset.info.get("cases", [])}
    for name in cases:
        if not labels.get(name):
            raise DataError(f"{dataset.path}: case {name!r} has no label; patches for training need labels")


class PatchCropper:
    """Reads, normalises and augments one patch; shared by the training stream and validation patches.

    Args:
        patch_size: (D, H, W).
        normalization: HU -> network input.
        transform: an ``AugmentationConfig`` (TorchIO pipeline built from it), any TorchIO transform of a
            ``Subject`` with ``image`` and ``label`` (applied to the region with ``margin``), or None.
        margin: voxels of context per side (z, y, x); default: from the ``AugmentationConfig``, or a
            quarter of the patch for a custom transform, 0 without one.
        target_spacing: (z, y, x) mm of the patch grid (``patch_size``, ``margin`` and ``start`` as in
            ``PatchSampler``); None: the case's own voxels.
        image_interpolation: ``linear`` or ``cubic`` (with a target spacing).
        label_interpolation: ``nearest`` or ``linear`` (per-class masks, then the largest; with a target spacing).
    """

    def __init__(
        self,
        patch_size: tuple[int, int, int],
        normalization: CTNormalization,
        transform: AugmentationConfig | object | None,
        margin: Sequence[int] | None = None,
        target_spacing: Sequence[float] | None = None,
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
    ):
        self.patch_size = patch_size
        self.target_spacing = None if target_spacing is None else tuple(float(t) for t in target_spacing)
        self.image_interpolation = check_interpolation(image_interpolation, "image_interpolation", IMAGE_INTERPOLATIONS)
        self.label_interpolation = check_interpolation(label_interpolation, "label_interpolation", LABEL_INTERPOLATIONS)
        self.normalization = normalization
        self.transform = transform
        if margin is not None and (len(margin) != 3 or min(margin) < 0):
            raise DataError(f"margin: expected three voxel counts >= 0 (z, y, x), got {margin!r}")
        self.margin = None if margin is None else tuple(int(m) for m in margin)
        self._built: dict = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_built": {}}  # TorchIO objects are rebuilt in each worker

    def margin_for(self, case: CTCase) -> tuple[int, int, int]:
        """The most context a patch of ``case`` can need (every context transform applied), in patch voxels."""
        if self.margin is not None:
            return self.margin
        if isinstance(self.transform, AugmentationConfig):
            return augmentation_margin(self.patch_size, self.target_spacing or case.spacing, self.transform)
        if self.transform is None:
            return (0, 0, 0)
        return tuple(p // 4 for p in self.patch_size)

    def _transforms(self, config: AugmentationConfig | None) -> tuple:
        """(region transform, patch transform) for ``config`` (the decided one), or the custom transform."""
        key = config if isinstance(self.transform, AugmentationConfig) else None
        if key not in self._built:
            from iunet3d.patches import transforms

            if isinstance(self.transform, AugmentationConfig):
                region = transforms.tio.Compose(transforms.region_steps(config), copy=False)
                patch = transforms.tio.Compose(transforms.patch_steps(config), copy=False)
                self._built[key] = (region if region.transforms else None, patch if patch.transforms else None)
            else:
                self._built[key] = (self.transform, None)
        return self._built[key]

    def __call__(self, case: CTCase, start: Sequence[int], seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """image float32 (1, D, H, W) and label int64 (D, H, W) of the patch starting at ``start`` (z, y, x).

        ``seed`` determines the augmentation (unused without a transform).
        """
        if self.target_spacing is not None:
            return self._resampled(case, start, seed)
        config = self.transform
        if isinstance(config, AugmentationConfig):
            config = config.draw_context_steps(seeded_rng(seed))
            margin = (
                self.margin if self.margin is not None else augmentation_margin(self.patch_size, case.spacing, config)
            )
        else:
            margin = self.margin_for(case)
        region_start = [s - m for s, m in zip(start, margin, strict=True)]
        region_size = [p + 2 * m for p, m in zip(self.patch_size, margin, strict=True)]
        image = self.normalization(case.read_image(region_start, region_size, pad_value=IMAGE_FILL_HU))
        label = case.read_label(region_start, region_size, pad_value=0)
        if self.transform is None:
            return torch.from_numpy(image)[None], torch.from_numpy(label.astype(np.int64))
        from iunet3d.patches.transforms import augment_region, region_affine

        origin = [o + s * d for o, s, d in zip(case.origin, region_start, case.spacing, strict=True)]
        with torch.random.fork_rng(devices=[]):  # TorchIO draws from torch's global generator
            torch.manual_seed(seed)
            image_t, label_t = augment_region(
                image, label, region_affine(case.spacing, origin), margin, *self._transforms(config)
            )
        return image_t, label_t.long()

    def _resampled(self, case: CTCase, start: Sequence[float], seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``__call__`` at the target spacing: one interpolation carries the resampling and the affine."""
        target = self.target_spacing
        config, matrix = self.transform, None
        if isinstance(config, AugmentationConfig):
            rng = seeded_rng(seed)
            config = config.draw_context_steps(rng)
            if config.affine_probability:
                matrix = affine_matrix(rng, config, target, case.spacing)
            config = replace(config, affine_probability=0.0)  # the sampling grid carries the affine
            margin = self.margin if self.margin is not None else augmentation_margin(self.patch_size, target, config)
        else:
            margin = self.margin_for(case)
        ratio = np.asarray(target) / np.asarray(case.spacing)
        grid = patch_grid(start, self.patch_size, margin, ratio, matrix)
        image, label = read_patch(case, grid, self.normalization, self.image_interpolation, self.label_interpolation)
        if self.transform is None:
            return torch.from_numpy(image)[None], torch.from_numpy(label.astype(np.int64))
        from iunet3d.patches.transforms import augment_region, region_affine

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image_t, label_t = augment_region(
                image, label, region_affine(target, (0.0, 0.0, 0.0)), margin, *self._transforms(config)
            )
        return image_t, label_t.long()


class PatchStream(IterableDataset):
    """Endless training patches of one rank, disjoint from every other rank's and worker's.

    Yields dicts: ``image`` float32 (C=1, D, H, W), ``label`` int64 (D, H, W), ``case`` (name),
    ``location`` int64 (3,) start (z, y, x) in the case's voxel grid before augmentation (may be negative
    at the border), ``index`` (global patch index).

    Args:
        dataset: a ``CTDataset`` or its path.
        patch_size: (D, H, W) voxels; anisotropic sizes such as (32, 128, 128) are fine.
        rank, world_size: this process's place in the job (DDP).
        seed: the whole sequence is a function of it.
        transform: ``AugmentationConfig`` (default: ``AugmentationConfig()``), a TorchIO transform, or
            None (no augmentation; intensity normalisation still applies).
        foreground_fraction: share of patches centred on a voxel of a class present in the case.
        class_probabilities: optional {class value: weight} for the class of a foreground patch.
        cases: case names to train on (default: all); see ``sampling.split_cases``.
        normalization: default ``CTNormalization.from_dataset`` (nnU-Net CT scheme).
        margin: context voxels per side for spatial augmentation (default: computed).
        block_size: patches per DataLoader batch (set by ``PatchLoader``; must equal the batch size for
            the worker-count-independent order).
        num_patches: stop after this many positions of this rank (default: endless).
        trim_every: in a DataLoader worker, return freed memory to the OS after every this many patches
            (glibc only; 0: never, the default). A worker allocates and frees regions of several MB per
            patch, which glibc keeps in fragmented arenas: its RSS grew by ~280 MB over a few hundred
            64x128x128 patches (measured); trimming every 4 patches kept it near its import size (~380 MB)
            but cost ~15% of throughput, as the returned pages fault in again.
        target_spacing: ``"native"`` (the cases' own voxels), ``"auto"`` (from the dataset's spacings:
            ``data.resampling.auto_target_spacing``; native when every case has it) or (z, y, x) mm: patches
            are then ``patch_size`` voxels at that spacing, resampled from each case on the fly.
        image_interpolation, label_interpolation: see ``PatchCropper``.
    """

    def __init__(
        self,
        dataset: CTDataset | Path | str,
        *,
        patch_size: Sequence[int],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        transform: AugmentationConfig | object | None = DEFAULT_AUGMENTATION,
        foreground_fraction: float = 0.33,
        class_probabilities: Mapping[int, float] | None = None,
        cases: Sequence[str] | None = None,
        normalization: CTNormalization | None = None,
        margin: Sequence[int] | None = None,
        block_size: int = 1,
        num_patches: int | None = None,
        trim_every: int = 0,
        target_spacing: str | Sequence[float] = "native",
        image_interpolation: str = "linear",
        label_interpolation: str = "nearest",
    ):
        super().__init__()
        dataset = open_dataset(dataset)
        check_rank(rank, world_size)
        if not isinstance(block_size, int) or block_size < 1:
            raise DataError(f"block_size: expected a positive integer, got {block_size!r}")
        if num_patches is not None and (not isinstance(num_patches, int) or num_patches < 0):
            raise DataError(f"num_patches: expected an integer >= 0 or None, got {num_patches!r}")
        if not isinstance(trim_every, int) or trim_every < 0:
            raise DataError(f"trim_every: expected an integer >= 0, got {trim_every!r}")
        self.target_spacing = dataset_target_spacing(dataset, target_spacing)
        self.sampler = PatchSampler(dataset, patch_size, seed, cases, foreground_fraction, class_probabilities,
                                    self.target_spacing)  # fmt: skip
        check_labelled(dataset, self.sampler.cases)
        self.patch_size = self.sampler.patch_size
        self.crop = PatchCropper(self.patch_size, normalization or CTNormalization.from_dataset(dataset), transform,
                                 margin, self.target_spacing, image_interpolation, label_interpolation)  # fmt: skip
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.block_size, self.num_patches, self.trim_every = block_size, num_patches, trim_every
        self.position = 0  #: this rank's next position when iteration starts

    def global_index(self, position: int) -> int:
        return position * self.world_size + self.rank

    def sample(self, position: int) -> dict:
        """The patch at ``position`` of this rank's sequence (what iteration yields there)."""
        draw = self.sampler.draw(self.global_index(position))
        augmentation_seed = int(seeded_rng(self.seed, draw.index, AUGMENTATION_SEED_STREAM).integers(2**63))
        image, label = self.crop(self.sampler.case(draw.case), draw.start, augmentation_seed)
        return {
            "image": image,
            "label": label,
            "case": draw.case,
            "location": torch.tensor(np.floor(draw.start), dtype=torch.int64),
            "index": draw.index,
        }

    def positions(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """This rank's positions from ``self.position`` that worker ``worker`` of ``num_workers`` produces."""
        block = self.position + worker * self.block_size
        while True:
            for position in range(block, block + self.block_size):
                if self.num_patches is not None and position >= self.num_patches:
                    return
                yield position
            block += num_workers * self.block_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        trim_every = self.trim_every if info is not None else 0  # the main process's heap is the trainer's
        for count, position in enumerate(self.positions(worker, num_workers), start=1):
            yield self.sample(position)
            if trim_every and count % trim_every == 0:
                release_free_memory()

    def start_at(self, position: int) -> None:
        """Continue from ``position`` (patches of this rank already consumed) at the next iteration."""
        if not isinstance(position, int) or position < 0:
            raise DataError(f"stream position: expected an integer >= 0, got {position!r}")
        self.position = position

    def state_dict(self, consumed: int = 0) -> dict:
        """Resume state after ``consumed`` more patches than ``self.position`` (``PatchLoader`` counts them)."""
        return {"position": self.position + consumed, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}  # fmt: skip

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``; the seed must match, and the world size for an exact resume.

        With a different world size the run goes on from the same global patch count (no patch index is
        repeated or skipped across the job as a whole, but ranks get different patches than before).
        """
        for key in ("position", "seed", "world_size"):
            if key not in state:
                raise DataError(f"patch stream state: missing key {key!r}")
        if state["seed"] != self.seed:
            raise DataError(f"patch stream state: saved with seed {state['seed']}, this stream has seed {self.seed}")
        position = int(state["position"])
        if state["world_size"] != self.world_size:
            position = -(-position * int(state["world_size"]) // self.world_size)
        self.start_at(position)
