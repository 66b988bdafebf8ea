"""OME-Zarr 0.5 metadata for a CT case: an image with axes z, y, x in millimetres, and its labels.

Spec: https://ngff.openmicroscopy.org/0.5/ -- all OME metadata sits under the ``"ome"`` attribute of a
Zarr v3 group, with ``"version": "0.5"``. Each case has one resolution level, array ``0``.
"""

from __future__ import annotations

from collections.abc import Sequence

OME_VERSION = "0.5"
AXES = ("z", "y", "x")
LEVEL_PATH = "0"

# Distinct colours for label values 1, 2, ... (RGBA); cycled for larger label values.
_LABEL_COLOURS = (
    (230, 25, 75, 255),
    (60, 180, 75, 255),
    (255, 225, 25, 255),
    (0, 130, 200, 255),
    (245, 130, 48, 255),
    (145, 30, 180, 255),
    (70, 240, 240, 255),
    (240, 50, 230, 255),
)


def multiscales(name: str, spacing: Sequence[float], origin: Sequence[float]) -> list[dict]:
    """One-level multiscales: physical position (mm) = index * spacing + origin, axes z, y, x."""
    return [
        {
            "name": name,
            "axes": [{"name": axis, "type": "space", "unit": "millimeter"} for axis in AXES],
            "datasets": [
                {
                    "path": LEVEL_PATH,
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [float(s) for s in spacing]},
                        {"type": "translation", "translation": [float(o) for o in origin]},
                    ],
                }
            ],
        }
    ]


def channel_image_attributes(
    name: str, spacing: Sequence[float], origin: Sequence[float], channel_names: Sequence[str]
) -> dict:
    """A one-level image with a leading channel axis (c, z, y, x), e.g. per-class probabilities; the
    channel names are listed in the ``omero`` block (its ``channels`` labels)."""
    (description,) = multiscales(name, spacing, origin)
    description["axes"] = [{"name": "c", "type": "channel"}, *description["axes"]]
    for transform in description["datasets"][0]["coordinateTransformations"]:
        key = transform["type"]
        transform[key] = [1.0 if key == "scale" else 0.0, *transform[key]]
    channels = [
        {"label": channel, "active": True, "coefficient": 1.0, "color": "FFFFFF", "family": "linear",
         "inverted": False, "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}
        for channel in channel_names
    ]  # fmt: skip
    return {"ome": {"version": OME_VERSION, "multiscales": [description], "omero": {"channels": channels}}}


def image_attributes(name: str, spacing: Sequence[float], origin: Sequence[float]) -> dict:
    return {"ome": {"version": OME_VERSION, "multiscales": multiscales(name, spacing, origin)}}


def labels_group_attributes(label_names: Sequence[str]) -> dict:
    return {"ome": {"version": OME_VERSION, "labels": list(label_names)}}


def label_image_attributes(
    name: str, spacing: Sequence[float], origin: Sequence[float], class_names: Sequence[str]
) -> dict:
    """An ``image-label``: colours and class names for values 1.. (0 is background)."""
    values = range(1, len(class_names))
    return {
        "ome": {
            "version": OME_VERSION,
            "multiscales": multiscales(name, spacing, origin),
            "image-label": {
                "version": OME_VERSION,
                "colors": [
                    {"label-value": v, "rgba": list(_LABEL_COLOURS[(v - 1) % len(_LABEL_COLOURS)])} for v in values
                ],
                "properties": [{"label-value": v, "class": class_names[v]} for v in values],
                "source": {"image": "../../"},
            },
        }
    }
