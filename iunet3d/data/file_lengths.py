"""Truncation checks: refuse an image file whose data is shorter than its header calls for, before ITK reads it.

ITK zero-fills a short NIfTI stream and GDCM skips a cut DICOM file in a series silently, so each format's
header is parsed here and the data measured against it: NIfTI (plain and gzipped), NRRD (raw and gzip,
attached or detached data), MetaImage (raw and zlib, local or one data file), DICOM (element headers walked
by ``dicom_series.dicom_header``). Layouts these checks do not cover are left to ITK.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from iunet3d.data.dicom_series import dicom_header
from iunet3d.data.errors import DataError

_CHUNK = 1 << 20


def _where(path: Path, data: Path) -> str:
    return f"{path}" if data == path else f"{path} (data file {data.name})"


def _inflated_size(raw, wbits: int) -> tuple[int, bool]:
    """Bytes out of the zlib (``wbits`` 15) or gzip (31; members one after another) stream read from ``raw``,
    and whether it reached its end-of-stream mark (zlib checks the gzip CRC on the way)."""
    total, pending = 0, b""
    while True:
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof:
            block = pending or raw.read(_CHUNK)
            produced = len(inflater.decompress(block, _CHUNK))  # at most one chunk out at a time
            pending = inflater.unconsumed_tail
            if not block and not produced:
                return total, False
            total += produced
        pending = inflater.unused_data or raw.read(2)
        if wbits != 31 or not pending.startswith(b"\x1f\x8b"):
            return total, True  # trailing bytes that are no gzip member are left to the reader


def _decompressed_size(path: Path, data: Path, offset: int, codec: str, what: str) -> int:
    """Bytes in the gzip/zlib stream that starts at ``offset`` of ``data`` (header ``path``), read through
    to its end-of-stream mark (one decompression pass, nothing kept); DataError where it stops early or is corrupt."""
    with open(data, "rb") as raw:
        raw.seek(offset)
        try:
            total, complete = _inflated_size(raw, 31 if codec == "gzip" else 15)
        except zlib.error as error:
            raise DataError(f"{_where(path, data)}: cannot read {what} (corrupt {codec} stream: {error})") from None
    if not complete:
        raise DataError(f"{_where(path, data)}: {what} file is truncated: its {codec} stream stops before its end")
    return total


def _refuse_short(path: Path, data: Path, what: str, have: int, need: int, layout: str) -> None:
    if have < need:
        raise DataError(
            f"{_where(path, data)}: {what} file is truncated: {have} bytes of data where its header calls for {need} "
            f"({layout})"
        )


def _check_nifti_length(path: Path, what: str) -> None:
    import nibabel

    try:
        proxy = nibabel.load(str(path)).dataobj  # the header only
        offset, shape, dtype = int(proxy.offset), proxy.shape, proxy.dtype
    except Exception:
        return  # no NIfTI header: ITK's read or check_nifti reports it
    gzipped = path.name.lower().endswith(".gz")
    have = (_decompressed_size(path, path, 0, "gzip", what) if gzipped else path.stat().st_size) - offset
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    _refuse_short(path, path, what, have, need, f"{'x'.join(map(str, shape))} voxels of {dtype}")


def _header_fields(path: Path, what: str, first: bytes, last_key: str | None) -> tuple[dict[str, str], int]:
    """ "key: value" / "Key = Value" text header: (fields with lower-case keys without spaces, data offset).

    It ends at a blank line (NRRD) or after the ``last_key`` line (MetaImage's ElementDataFile)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as file:
        if not file.readline().startswith(first):
            raise DataError(f"{path}: cannot read {what} (no {first.decode()} header)")
        file.seek(0)
        for line in iter(file.readline, b""):
            text = line.decode("latin-1").strip()
            if not text and last_key is None:
                break
            key, _, value = text.partition("=" if last_key else ":")
            if text.startswith("#") or value.startswith("="):
                continue
            fields[key.replace(" ", "").lower()] = value.strip()
            if key.strip().lower() == last_key:
                break
        return fields, file.tell()


def _nrrd_type_size(name: str) -> int | None:
    name = name.lower()
    if name in ("float", "double"):
        return 4 if name == "float" else 8
    for key, size in (("8", 1), ("16", 2), ("32", 4), ("64", 8), ("char", 1), ("short", 2), ("long", 8), ("int", 4)):
        if key in name:
            return size
    return None  # "block": sized by "block size"; not checked


def _check_nrrd_length(path: Path, what: str) -> None:
    """Raw and gzip encodings; ascii/hex, bzip2 (ITK cannot read it), multi-file data and line skips: left to ITK."""
    fields, offset = _header_fields(path, what, b"NRRD", None)
    data, name = path, fields.get("datafile")
    if name is not None:
        data, offset = path.parent / name, 0
        if name.upper() == "LIST" or " " in name or not data.is_file():
            return
    try:
        sizes = [int(value) for value in fields["sizes"].split()]
        skip, lines = int(fields.get("byteskip", 0)), int(fields.get("lineskip", 0))
    except (KeyError, ValueError):
        raise DataError(f"{path}: cannot read {what} (NRRD header lacks valid sizes)") from None
    item, encoding = _nrrd_type_size(fields.get("type", "")), fields.get("encoding", "raw").lower()
    if item is None or lines:
        return
    need, layout = int(np.prod(sizes, dtype=np.int64)) * item, f"{fields['sizes']} x {item}-byte {encoding} values"
    if encoding == "raw":  # byte skip -1: the data are the file's last bytes
        have = data.stat().st_size - (offset + skip if skip >= 0 else 0)
        _refuse_short(path, data, what, have, need, layout)
    elif encoding in ("gzip", "gz"):
        have = _decompressed_size(path, data, offset, "gzip", what) - max(skip, 0)
        _refuse_short(path, data, what, have, need, layout)


_MET_SIZES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4, "ULONG": 4}
_MET_SIZES |= {"LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}


def _check_metaimage_length(path: Path, what: str) -> None:
    """Binary data, raw or zlib-compressed, in the file (LOCAL) or in one data file; lists are left to ITK."""
    fields, offset = _header_fields(path, what, b"", "elementdatafile")
    data, name = path, fields.get("elementdatafile", "")
    if name.upper() != "LOCAL":
        data, offset = path.parent / name, 0
        if not name or name.upper() == "LIST" or "%" in name or not data.is_file():
            return
    item = _MET_SIZES.get(fields.get("elementtype", "").upper().removeprefix("MET_"))
    if item is None or fields.get("binarydata", "true").lower() != "true":
        return
    try:
        sizes = [int(value) for value in fields["dimsize"].split()]
        channels, skip = int(fields.get("elementnumberofchannels", 1)), int(fields.get("headersize", 0))
    except (KeyError, ValueError):
        raise DataError(f"{path}: cannot read {what} (MetaImage header lacks a valid DimSize)") from None
    need = int(np.prod(sizes, dtype=np.int64)) * channels * item
    layout = f"{fields['dimsize']} x {channels} x {item}-byte values"
    if fields.get("compresseddata", "false").lower() == "true":
        _refuse_short(path, data, what, _decompressed_size(path, data, offset, "zlib", what), need, layout)
    else:  # header size -1: the data are the file's last bytes
        _refuse_short(path, data, what, data.stat().st_size - (offset + skip if skip >= 0 else 0), need, layout)


def check_file_length(path: Path, what: str) -> None:
    """Refuse a truncated or short image file before ITK reads it (ITK zero-fills a short NIfTI stream).

    Cost: a header parse and a size comparison; a compressed stream (.nii.gz, gzip NRRD, compressed
    MetaImage) is decompressed once more, counting bytes without keeping them (about as long as ITK's own
    read of it). DICOM files are walked element header by element header; the pixel data is only measured.
    """
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti_length(path, what)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd_length(path, what)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage_length(path, what)
    else:
        dicom_header(path, what)
