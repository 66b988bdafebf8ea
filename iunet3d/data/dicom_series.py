"""DICOM series: walk each file's element headers, check the series is one evenly spaced stack, and read it.

The walker reads only element headers (pixel data is measured, not read) to get each slice's position,
orientation and frame count, and refuses a cut file. A series is one multi-frame file, or single-frame slices
with one orientation, one slice per position, uniform spacing and no gantry tilt, read in slice-normal order.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iunet3d.data.errors import DataError

DIRECTION_ATOL = 1e-4  # direction cosines agree within this (slice orientations; image vs label in image_files)
SLICE_STEP_RTOL = 0.01  # DICOM slice steps may differ from the median step by 1% of it, or
SLICE_STEP_ATOL_MM = 0.01  # by 0.01 mm where that is larger

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
_DICOM_TAGS = {(0x0020, 0x0032): "position", (0x0020, 0x0037): "orientation", (0x0028, 0x0008): "frames"}
_DICOM_TAGS |= {(0x0028, 0x0010): "rows", (0x0028, 0x0011): "columns", (0x0028, 0x0100): "bits"}
_DICOM_TAGS |= {(0x0028, 0x0002): "samples"}


class _ShortError(Exception):
    """A DICOM element runs past the end of the file."""


def _element(buf, pos: int, explicit: bool, order: str) -> tuple[tuple[int, int], bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _ShortError
    tag = struct.unpack_from(order + "HH", buf, pos)
    if tag[0] == 0xFFFE or not explicit:
        return tag, None, struct.unpack_from(order + "I", buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _ShortError
        return tag, vr, struct.unpack_from(order + "I", buf, pos + 8)[0], pos + 12
    return tag, vr, struct.unpack_from(order + "H", buf, pos + 6)[0], pos + 8


def _skip_items(buf, pos: int, explicit: bool, order: str) -> int:
    """Offset after the sequence delimiter of an undefined-length sequence (or encapsulated pixel data)."""
    while True:
        tag, _, length, value = _element(buf, pos, explicit, order)
        if tag == _SEQUENCE_END:
            return value
        if tag != _ITEM:
            raise _ShortError  # lost in the structure: the file is cut or corrupt
        pos = _walk(buf, value, explicit, order, None)[0] if length == _UNDEFINED else value + length
        if pos > len(buf):
            raise _ShortError


def _walk(buf, pos: int, explicit: bool, order: str, values: dict | None) -> tuple[int, int | None]:
    """Walk elements to an item delimiter or the file end: (end offset, pixel data length or None; -1 when
    encapsulated). At the top level (``values`` given) keeps the few tags of ``_DICOM_TAGS``."""
    while pos < len(buf):
        tag, vr, length, value = _element(buf, pos, explicit, order)
        if tag == _ITEM_END:
            return value, None
        if length == _UNDEFINED:
            pos = _skip_items(buf, value, explicit and vr != b"UN", order)
        elif value + length > len(buf):
            raise _ShortError
        else:
            pos = value + length
        if values is not None and tag in _DICOM_TAGS:
            values[_DICOM_TAGS[tag]] = bytes(buf[value : value + length])
        if values is not None and tag == _PIXEL_DATA:
            return pos, -1 if length == _UNDEFINED else length
    return pos, None


def _dicom_number(values: dict, key: str, order: str, default: int = 1) -> int:
    raw = values.get(key)
    try:
        if raw is not None:
            return int(raw.strip(b" \0")) if key == "frames" else struct.unpack_from(order + "H", raw)[0]
    except (ValueError, struct.error):
        pass
    return default


def dicom_header(path: Path, what: str) -> dict | None:
    """Position, orientation and frame count of a DICOM image whose pixel data is complete; None for a file
    without the "DICM" preamble or without image attributes (a DICOMDIR, a report); DataError for a cut file.

    Walks the element headers only (pixel data is measured, not read); a deflated data set is left to GDCM.
    """
    with open(path, "rb") as file:
        if file.read(132)[128:] != b"DICM":
            return None
        buf = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        values: dict = {}
        try:
            pos, syntax = 132, b""
            while pos + 8 <= len(buf) and struct.unpack_from("<H", buf, pos)[0] == 0x0002:  # file meta: explicit LE
                tag, _, length, value = _element(buf, pos, True, "<")
                if value + length > len(buf):
                    raise _ShortError
                syntax, pos = (bytes(buf[value : value + length]) if tag == (2, 0x10) else syntax), value + length
            syntax = syntax.strip(b" \0").decode("ascii", "replace")
            if syntax == "1.2.840.10008.1.2.1.99":
                return {"frames": 1}
            order = ">" if syntax == "1.2.840.10008.1.2.2" else "<"
            _, pixel_length = _walk(buf, pos, syntax != "1.2.840.10008.1.2", order, values)
        except (_ShortError, struct.error):
            raise DataError(
                f"{path}: {what} DICOM file is truncated or corrupt (an element runs past its end)"
            ) from None
    if pixel_length is None and "rows" not in values:
        return None
    if pixel_length is None:
        raise DataError(f"{path}: {what} DICOM file is truncated: it describes an image but ends before its pixel data")
    frames = _dicom_number(values, "frames", order)
    need = _dicom_number(values, "rows", order, 0) * _dicom_number(values, "columns", order, 0) * frames
    need *= _dicom_number(values, "samples", order) * _dicom_number(values, "bits", order, 16) // 8
    if pixel_length != -1 and pixel_length < need:
        raise DataError(f"{path}: {what} DICOM file is truncated: {pixel_length} bytes of pixel data, expected {need}")
    return {"frames": frames, **{key: _dicom_floats(values.get(key)) for key in ("position", "orientation")}}


def _dicom_floats(raw: bytes | None) -> np.ndarray | None:
    try:
        return None if raw is None else np.array([float(v) for v in raw.decode("latin-1").strip(" \0").split("\\")])
    except ValueError:
        return None


def _slices_in_order(path: Path, names: list[str], headers: dict[str, dict]) -> list[str]:
    """The series' files sorted along the slice normal, after checking its geometry.

    One orientation (every ImageOrientationPatient within 1e-4 of the first slice's), one slice per position,
    uniform spacing: every step along the slice normal within max(1% of the median step, 0.01 mm) of the median
    step (``SLICE_STEP_RTOL``, ``SLICE_STEP_ATOL_MM``), and every slice within that same tolerance of the line
    through the first slice along the normal (a gantry tilt shears the stack, which ITK cannot represent).
    """
    files = [Path(name).name for name in names]
    geometry = [(headers.get(file) or {}).get(key) for file in files for key in ("position", "orientation")]
    for file, position, orientation in zip(files, geometry[::2], geometry[1::2], strict=True):
        if position is None or orientation is None or position.shape != (3,) or orientation.shape != (6,):
            raise DataError(f"{path}: {file} has no valid ImagePositionPatient/ImageOrientationPatient; expected both")
        if not np.allclose(orientation, geometry[1], atol=DIRECTION_ATOL, rtol=0):
            raise DataError(
                f"{path}: slice {file} has orientation {_numbers(orientation)}, slice {files[0]} "
                f"{_numbers(geometry[1])}; expected one ImageOrientationPatient for the whole series"
            )
    normal = np.cross(geometry[1][:3], geometry[1][3:])
    positions = np.array(geometry[::2])
    order = np.argsort(positions @ normal, kind="stable")
    files, positions = [files[k] for k in order], positions[order]
    z = positions @ normal
    steps = np.diff(z)
    median = float(np.median(steps)) if len(steps) else 0.0
    tolerance = max(SLICE_STEP_RTOL * median, SLICE_STEP_ATOL_MM)
    for k in np.flatnonzero(steps <= tolerance):
        raise DataError(
            f"{path}: slices {files[k]} and {files[k + 1]} are both at z={z[k]:.2f} mm (along the slice normal); "
            "expected one slice per position"
        )
    for k in np.flatnonzero(np.abs(steps - median) > tolerance):
        raise DataError(
            f"{path}: gap between z={z[k]:.2f} and z={z[k + 1]:.2f} mm ({files[k]}, {files[k + 1]}) is "
            f"{steps[k]:.2f} mm, median spacing {median:.2f} mm; expected uniform spacing (within {tolerance:.2f} mm)"
        )
    drift = np.linalg.norm(positions - positions[0] - np.outer(z - z[0], normal), axis=1)
    for k in np.flatnonzero(drift > tolerance):
        raise DataError(
            f"{path}: slice {files[k]} lies {drift[k]:.2f} mm off the slice normal through {files[0]} (gantry tilt?); "
            "expected slices stacked along their normal"
        )
    return [str(path / file) for file in files]


def _numbers(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def read_dicom_series(path: Path, what: str) -> sitk.Image:
    headers = {}  # every DICOM file, also those GDCM would leave out of the series (it skips a cut file silently)
    for entry in sorted(path.iterdir()):
        if entry.is_file() and (header := dicom_header(entry, what)) is not None:
            headers[entry.name] = header
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise DataError(f"{path}: directory holds no DICOM series (and is not an image file)")
    if len(series) > 1:
        raise DataError(f"{path}: directory holds {len(series)} DICOM series ({', '.join(series)}); expected one")
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
    multi_frame = [Path(name).name for name in names if (headers.get(Path(name).name) or {}).get("frames", 1) > 1]
    if multi_frame and len(names) > 1:
        raise DataError(
            f"{path}: series of {len(names)} files, {len(multi_frame)} multi-frame ({multi_frame[0]}, ...); expected "
            "one multi-frame file or single-frame slices"
        )
    if multi_frame:
        return sitk.ReadImage(names[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_slices_in_order(path, names, headers))
    return reader.Execute()
