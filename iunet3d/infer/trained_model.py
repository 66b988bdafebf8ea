"""A trained segmentation network restored from a training checkpoint, ready for whole-volume prediction."""

from __future__ import annotations

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
    progress: bool = False,
    out=None,
):
    """Labels uint8 (D, H, W) of the HU volume ``image`` (D, H, W; numpy or Zarr), written into ``out``
    (e.g. a Zarr array, so not even the labels need to fit in memory) or a new numpy array, returned.

    The blended outputs are accumulated in memory when they fit in ``max_memory`` bytes (default: no
    limit), else streamed through a chunked Zarr accumulator in a temporary directory under ``scratch``;
    the labels are the same either way (up to float rounding at exact ties).
    """
    shape = tuple(image.shape)
    num_classes = len(model.class_names)
    predictor = SlidingWindowPredictor(model.network, model.patch_size, overlap=overlap, batch_size=batch_size,
                                       mirror=mirror, device=device, progress=progress)  # fmt: skip
    labels = np.zeros(shape, np.uint8) if out is None else out
    if tuple(labels.shape) != shape:
        raise ValueError(f"out: shape {tuple(labels.shape)} differs from the image's {shape}")
    if max_memory is None or accumulator_bytes(num_classes, shape) <= max_memory:
        accumulator = MemoryAccumulator(num_classes, shape, block=(model.patch_size[0], *shape[1:]))
        write_labels(predictor.predict(image, accumulator, model.normalization), labels)
        return labels
    chunk = tuple(max(1, p // 2) for p in model.patch_size)  # a window covers 2-3 chunks per axis
    with tempfile.TemporaryDirectory(prefix="iunet3d-accumulator-", dir=scratch) as directory:
        accumulator = ZarrAccumulator(Path(directory) / "accumulator.zarr", num_classes, shape, chunk)
        write_labels(predictor.predict(image, accumulator, model.normalization), labels)
    return labels
