"""A trained segmentation network restored from a training checkpoint, ready for whole-volume prediction."""

from __future__ import annotations

import math
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iunet3d.data.normalization import CTNormalization
from iunet3d.infer.accumulator import MemoryAccumulator, ZarrAccumulator, accumulator_bytes
from iunet3d.infer.sliding_window import SlidingWindowPredictor, write_labels
from iunet3d.models.segmentation import SegmentationIUNet


@dataclass
class TrainedModel:
    """The network of a checkpoint (eval mode) with what prediction needs to know about its training."""

    network: SegmentationIUNet
    class_names: list[str]
    in_channels: int
    patch_size: tuple[int, int, int]
    normalization: CTNormalization
    step: int
    source: Path

    def check_input(self, class_names: Sequence[str] | None = None, channels: int = 1, what: str = "input") -> None:
        """Refuse an input whose channels (or, when it has labels, classes) differ from the training data's."""
        if channels != self.in_channels:
            raise ValueError(
                f"{what}: has {channels} image channel(s), but checkpoint {self.source} was trained on "
                f"{self.in_channels}"
            )
        if class_names is not None and list(class_names) != self.class_names:
            raise ValueError(
                f"{what}: has classes {list(class_names)}, but checkpoint {self.source} predicts {self.class_names}"
            )


def load_trained_model(path: Path | str, device: torch.device | str = "cpu") -> TrainedModel:
    """The network of the training checkpoint at ``path``; a file that is not one fails naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    required = ("model", "network", "class_names", "normalization", "patch_size")
    missing = [key for key in required if key not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise ValueError(f"{path}: not an iunet3d training checkpoint (missing {', '.join(missing) or 'everything'})")
    kwargs = dict(state["network"])
    network = SegmentationIUNet(**kwargs)
    network.load_state_dict(state["model"])
    network.to(device).eval()
    return TrainedModel(
        network=network,
        class_names=list(state["class_names"]),
        in_channels=int(kwargs["in_channels"]),
        patch_size=tuple(state["patch_size"]),
        normalization=CTNormalization(**state["normalization"]),
        step=int(state["step"]),
        source=path,
    )


def predict_volume(
    model: TrainedModel,
    image,
    *,
    overlap: float = 0.5,
    mirror: bool = False,
    batch_size: int = 2,
    max_memory: int | None = None,
    scratch: Path | str | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    out=None,
    probabilities=None,
    stream: bool | None = None,
):
    """Labels uint8 (D, H, W) of the HU volume ``image`` (D, H, W; numpy or Zarr), written into ``out``
    (e.g. a Zarr array, so not even the labels need to fit in memory) or a new numpy array, returned;
    and, when ``probabilities`` (K, D, H, W) is given, the softmax of the blended output into it.

    The blended outputs are accumulated in memory when everything fits in ``max_memory`` bytes (default:
    no limit), else streamed through a chunked Zarr accumulator in a temporary directory under
    ``scratch``; the labels are the same either way (up to float rounding at exact ties). The limit
    covers the buffers of prediction (accumulator, windows and their outputs, blocks being finalised),
    not the network's own activations; a limit too small even for streaming fails naming its minimum.
    ``stream`` True or False forces either way (then ``max_memory`` is only checked when streaming).
    """
    shape = tuple(image.shape)
    num_classes = len(model.class_names)
    predictor = SlidingWindowPredictor(model.network, model.patch_size, overlap=overlap, batch_size=batch_size,
                                       mirror=mirror, device=device, autocast_dtype=autocast_dtype,
                                       progress=progress)  # fmt: skip
    labels = np.zeros(shape, np.uint8) if out is None else out
    for name, array, expected in (("out", labels, shape), ("probabilities", probabilities, (num_classes, *shape))):
        if array is not None and tuple(array.shape) != expected:
            raise ValueError(f"{name}: shape {tuple(array.shape)}, expected {expected}")
    with_probabilities = probabilities is not None
    output_chunk = tuple(getattr(labels, "chunks", None) or (model.patch_size[0], *shape[1:]))
    in_memory = in_memory_bytes(num_classes, shape, model.patch_size, batch_size, output_chunk, with_probabilities)
    if stream is False or (stream is None and (max_memory is None or in_memory <= max_memory)):
        accumulator = MemoryAccumulator(num_classes, shape, block=(min(output_chunk[0], shape[0]), *shape[1:]))
        write_labels(predictor.predict(image, accumulator, model.normalization), labels, probabilities)
        return labels
    chunk = tuple(max(1, p // 2) for p in model.patch_size)  # a window covers 2-3 chunks per axis
    needed = streaming_bytes(num_classes, model.patch_size, batch_size, chunk)
    whole_chunks = needed + finalize_bytes(num_classes, output_chunk, with_probabilities)
    block = output_chunk if max_memory is None or whole_chunks <= max_memory else chunk  # each written once
    needed += finalize_bytes(num_classes, block, with_probabilities)
    if max_memory is not None and needed > max_memory:
        raise ValueError(
            f"max memory {max_memory / 2**20:.1f} MB is below the {needed / 2**20:.1f} MB that streaming needs "
            f"with {tuple(model.patch_size)} windows, batch size {batch_size} and {num_classes} classes"
        )
    with tempfile.TemporaryDirectory(prefix="iunet3d-accumulator-", dir=scratch) as directory:
        accumulator = ZarrAccumulator(Path(directory) / "accumulator.zarr", num_classes, shape, chunk, block=block)
        write_labels(predictor.predict(image, accumulator, model.normalization), labels, probabilities)
    return labels


def in_memory_bytes(
    num_classes: int,
    shape: Sequence[int],
    patch_size: Sequence[int],
    batch_size: int,
    output_chunk: Sequence[int] | None = None,
    probabilities: bool = False,
) -> int:
    """Prediction buffers with the accumulator in memory: the accumulator, a batch of windows, and one
    slab (``output_chunk`` deep, default one window deep) being finalised."""
    depth = (output_chunk or patch_size)[0]
    slab = (min(depth, shape[0]), *shape[1:])
    return (accumulator_bytes(num_classes, shape) + window_bytes(num_classes, patch_size, batch_size)
            + finalize_bytes(num_classes, slab, probabilities))  # fmt: skip


def window_bytes(num_classes: int, patch_size: Sequence[int], batch_size: int) -> int:
    """A batch of float32 windows, its outputs and their sum over mirrorings."""
    return 4 * batch_size * math.prod(patch_size) * (1 + 2 * num_classes)


def streaming_bytes(num_classes: int, patch_size: Sequence[int], batch_size: int, chunk: Sequence[int]) -> int:
    """Windows, plus the accumulator chunks one window touches, read and written back (twice)."""
    touched = math.prod((math.ceil(p / c) + 1) * c for p, c in zip(patch_size, chunk, strict=True))
    return window_bytes(num_classes, patch_size, batch_size) + 2 * accumulator_bytes(num_classes, [touched])


def finalize_bytes(num_classes: int, block: Sequence[int], probabilities: bool) -> int:
    """Finalising one block: its sums and weights, the blend, int64 argmax, and the softmax if wanted."""
    per_voxel = 4 * (num_classes + 1) + 4 * num_classes + 8 + (12 * num_classes if probabilities else 0)
    return per_voxel * math.prod(block)
