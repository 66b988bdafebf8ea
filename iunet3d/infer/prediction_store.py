"""Predictions stored as OME-Zarr labels: ``<out>/<case>/labels/prediction/0`` in a copy of each case.

The output is a dataset of the input's layout. Each case is staged (``staging.staged_case``): copied
(image, ground-truth labels and index) into ``<out>/.partial/<case>``, the prediction written there, and
only then renamed into place, so an interrupted prediction never leaves a case that looks complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data import ome
from iunet3d.data.dataset import CTCase
from iunet3d.data.staging import staged_case
from iunet3d.data.storage import StorageOptions, blosc_codec, chunk_shape, codec_pipeline

PREDICTION = "prediction"
PROBABILITIES = "probabilities"  #: ``<case>/probabilities/0``: float16 (K, D, H, W) softmax, OME channel image


def write_prediction_case(
    source: CTCase,
    out: Path,
    class_names: Sequence[str],
    fill: Callable[[zarr.Array, zarr.Array | None], None],
    options: StorageOptions | None = None,
    probabilities: bool = False,
) -> Path:
    """Copy case ``source`` into dataset ``out`` with a ``prediction`` label that ``fill`` writes into the
    given empty uint8 (D, H, W) array and, with ``probabilities``, the class probabilities into the
    given float16 (K, D, H, W) array (else None); returns the final case path."""
    options = options or StorageOptions()
    with staged_case(out, source.name, copy_of=source.path) as partial:
        _write_prediction(zarr.open_group(partial, mode="r+"), source, class_names, fill, options, probabilities)
    return out / source.name


def prediction_chunks(source: CTCase, options: StorageOptions | None = None) -> tuple[int, ...]:
    """The chunks of a case's prediction label (as of its image, for the case's shape and spacing)."""
    return chunk_shape(source.shape, source.spacing, options or StorageOptions())


def _write_prediction(case: zarr.Group, source: CTCase, class_names, fill, options, probabilities: bool) -> None:
    info = dict(case.attrs["iunet3d"])
    names = [name for name in info.get("labels", []) if name != PREDICTION] + [PREDICTION]
    labels = case.require_group("labels")
    labels.update_attributes(ome.labels_group_attributes(names))
    if PREDICTION in labels:
        del labels[PREDICTION]
    attributes = ome.label_image_attributes(PREDICTION, source.spacing, source.origin, list(class_names))
    group = labels.create_group(PREDICTION, attributes=attributes)
    chunks = prediction_chunks(source, options)
    with codec_pipeline():
        array = group.create_array(
            ome.LEVEL_PATH,
            shape=source.shape,
            dtype="uint8",
            chunks=chunks,
            compressors=[blosc_codec(options, np.dtype("uint8"))],
            fill_value=0,
            dimension_names=["z", "y", "x"],
        )
        probability_array = None
        if PROBABILITIES in case:
            del case[PROBABILITIES]
        if probabilities:
            attributes = ome.channel_image_attributes(PROBABILITIES, source.spacing, source.origin, class_names)
            probability_array = case.create_group(PROBABILITIES, attributes=attributes).create_array(
                ome.LEVEL_PATH,
                shape=(len(class_names), *source.shape),
                dtype="float16",
                chunks=(1, *chunks),
                compressors=[blosc_codec(options, np.dtype("float16"))],
                fill_value=0.0,
                dimension_names=["c", "z", "y", "x"],
            )
        fill(array, probability_array)
    case.update_attributes({"iunet3d": {**info, "labels": names}})
