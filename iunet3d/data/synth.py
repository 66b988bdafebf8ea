"""Synthetic CT-like torso phantoms with organ labels, for tests and demos without real data.

A phantom is built in physical space (millimetres, voxel centres at ``index * spacing``), so anisotropic
spacing changes the sampling, not the anatomy. The field of view is ``shape * spacing`` and the body and its
structures scale with it, so a 16x32x32 volume still holds every class and a 320x512x512 one looks like a torso:

* air (-1000 HU) around an elliptic body of soft tissue (~40 HU, optional subcutaneous fat ~-100 HU), randomly
  sized, shifted and rotated in-plane, running through the whole z extent;
* two lungs (~-850 HU) above domed bases and a vertebral column (~+700 HU) at the back: not labelled;
* label 1 "liver", a large low-contrast organ (~60 HU); label 2 "kidney", one or two enhanced organs (~150 HU);
  label 3 "lesion", 1-3 hypodense spots (~10 HU, ~5-15 mm) inside the liver.

Organs are ellipsoids with random semi-axes and rotation, their surface perturbed by a smooth random field. The
HU image gets a partial-volume Gaussian blur and Gaussian noise; the label is the sharp membership at voxel
centres. Only numpy is used (no scipy or torch), so this runs in lightweight conversion worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SYNTH_CLASS_NAMES: tuple[str, ...] = ("background", "liver", "kidney", "lesion")
DEFAULT_SHAPE = (64, 160, 160)  # z, y, x voxels
DEFAULT_SPACING = (2.5, 0.8, 0.8)  # z, y, x mm

MEAN_HU = {"air": -1000, "tissue": 40, "fat": -100, "lung": -850, "bone": 700, "liver": 60, "kidney": 150, "lesion": 10}
HU_JITTER = {"air": 0, "lung": 30, "bone": 30}  # +- range of the per-phantom HU; 5 for the others
MIN_SIDE = 8
CHUNK = 16  # slices (or rows) per block of the block-wise passes: bounds temporary memory


@dataclass(frozen=True)
class _Blob:
    """A smoothly perturbed ellipsoid: ``centre`` (z, y, x) mm, ``semi`` mm along the rows of ``rotation``."""

    centre: np.ndarray  # (3,)
    semi: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3): world offset (z, y, x) -> local axes
    waves: np.ndarray  # (K, 3) wave vectors of the surface perturbation, per unit semi-axis
    phases: np.ndarray  # (K,)
    amp: float = 0.15  # relative amplitude of the radius perturbation


@dataclass(frozen=True)
class _Torso:
    """The body frame and the in-plane (y, x) maps of the unlabelled anatomy."""

    spacing: tuple[float, float, float]
    centre: np.ndarray  # (3,) mm: z of the organ layout's centre, (y, x) of the body's
    scale: float  # mm, geometric mean of the body's in-plane semi-axes (AP, lateral)
    z_scale: float  # mm, ``scale`` shrunk so that the layout fits a short field of view
    semi_yx: np.ndarray  # (2,) mm: body semi-axes (AP, lateral)
    rotation: np.ndarray  # (3, 3): world -> body frame (z, AP, lateral), a rotation about z
    rho: np.ndarray  # (Y, X) normalised body radius: inside where rho <= width(z)
    width_wave: tuple[float, float, float]  # amplitude, wavelength (mm), phase of the body width along z
    fat: float  # fat layer thickness in units of rho (0: none)
    lung_base: np.ndarray  # (Y, X) mm: lung where z > lung_base (inf outside the lungs)
    spine: np.ndarray  # (Y, X) bool: vertebral body, arch and spinous process
    vertebra: tuple[float, float, float]  # period, phase, disc thickness (mm)

    def point(self, lateral: float, ap: float, up: float) -> np.ndarray:
        """World (z, y, x) mm of a point in body units: lateral/AP in semi-axes, up in ``z_scale`` from z0."""
        offset = np.array([up * self.z_scale, ap * self.semi_yx[0], lateral * self.semi_yx[1]])
        return self.centre + self.rotation.T @ offset


def _plane_rotation(i: int, j: int, angle: float) -> np.ndarray:
    matrix = np.eye(3)
    matrix[[i, j], [i, j]] = math.cos(angle)
    matrix[i, j], matrix[j, i] = -math.sin(angle), math.sin(angle)
    return matrix


def _random_blob(rng: np.random.Generator, centre: np.ndarray, semi, rotation: np.ndarray, tilt=0.25) -> _Blob:
    """Jitter ``semi`` by +-15 % and tilt ``rotation`` by up to ``tilt`` rad in the (y, x), (z, x), (z, y) planes."""
    semi = np.asarray(semi, dtype=float) * rng.uniform(0.85, 1.15, 3)
    for (i, j), angle in zip(((1, 2), (0, 2), (0, 1)), rng.uniform(-tilt, tilt, 3), strict=True):
        rotation = _plane_rotation(i, j, angle) @ rotation
    return _Blob(centre, semi, rotation, rng.normal(0.0, 1.5, (3, 3)), rng.uniform(0, 2 * np.pi, 3))


def _body_frame(shape, spacing, centre: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ap, lateral): (Y, X) mm offsets of the voxel centres from the body centre, in the body frame."""
    y = (np.arange(shape[1]) * spacing[1] - centre[0])[:, None]
    x = (np.arange(shape[2]) * spacing[2] - centre[1])[None, :]
    return rotation[1, 1] * y + rotation[1, 2] * x, rotation[2, 1] * y + rotation[2, 2] * x


def _lung_base(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, z0: float, z_scale: float) -> np.ndarray:
    """(Y, X) mm: two lungs lie above domed bases (inf outside them); ``u``, ``v`` in body semi-axes."""
    base = np.full(u.shape, np.inf)
    for side, lift in ((-1, 0.05), (1, 0.0)):  # the patient's right (image left) lies higher, above the liver
        r2 = ((u - side * rng.uniform(0.42, 0.48)) / rng.uniform(0.27, 0.32)) ** 2
        r2 = r2 + ((v + 0.05) / rng.uniform(0.5, 0.58)) ** 2
        base = np.where(r2 <= 1, np.minimum(base, z0 + (0.3 + lift + 0.2 * (1 - r2)) * z_scale), base)
    return base.astype(np.float32)


def _spine(ap: np.ndarray, lateral: np.ndarray, body_ap: float, scale: float) -> np.ndarray:
    """(Y, X) bool: vertebral body, neural arch and spinous process, at the back of a body of AP semi-axis."""
    vertebral_body = (lateral / (0.16 * scale)) ** 2 + ((ap - 0.4 * body_ap) / (0.12 * scale)) ** 2 <= 1
    canal = 0.4 * body_ap + 0.2 * scale
    arch = np.abs(np.hypot(lateral, ap - canal) - 0.065 * scale) <= 0.02 * scale
    process = (lateral / (0.025 * scale)) ** 2 + ((ap - canal - 0.1 * scale) / (0.04 * scale)) ** 2 <= 1
    return vertebral_body | arch | process


def _make_torso(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]) -> _Torso:
    """A random body (size, shift, in-plane rotation, outline harmonics) scaled to the field of view."""
    fov = np.multiply(shape, spacing)
    grid_centre = np.subtract(shape, 1) * spacing / 2
    half = min(fov[1], fov[2]) / 2
    semi = half * np.array([rng.uniform(0.55, 0.68), rng.uniform(0.78, 0.9)])
    centre = grid_centre[1:] + rng.uniform(-0.04, 0.04, 2) * half
    rotation = _plane_rotation(1, 2, rng.uniform(-0.08, 0.08))
    scale = float(np.sqrt(semi.prod()))
    z_scale = min(scale, 0.6 * fov[0])
    z0 = grid_centre[0] + rng.uniform(-0.05, 0.05) * fov[0]
    ap, lateral = _body_frame(shape, spacing, centre, rotation)
    u, v = lateral / semi[1], ap / semi[0]
    harmonics = sum(rng.uniform(0, 0.03) * np.cos(k * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    period = 0.25 * scale
    return _Torso(
        spacing=spacing,
        centre=np.array([z0, *centre]),
        scale=scale,
        z_scale=z_scale,
        semi_yx=semi,
        rotation=rotation,
        rho=(np.hypot(u, v) / (1 + harmonics)).astype(np.float32),
        width_wave=(rng.uniform(0, 0.04), rng.uniform(2, 4) * scale, rng.uniform(0, 2 * np.pi)),
        fat=rng.uniform(0.03, 0.08) if rng.random() < 0.8 else 0.0,
        lung_base=_lung_base(rng, u, v, z0, z_scale),
        spine=_spine(ap, lateral, semi[0], scale),
        vertebra=(period, rng.uniform(0, period), 0.25 * period),
    )


def _organ_blobs(rng: np.random.Generator, torso: _Torso) -> tuple[_Blob, list[_Blob]]:
    """The liver and one or two kidneys, placed in body units (semi-axes ordered z, AP, lateral)."""
    s, sz = torso.scale, torso.z_scale
    sides = (-1, 1) if rng.random() < 0.8 else (int(rng.choice((-1, 1))),)
    kidneys = []
    for side in sides:
        centre = torso.point(side * rng.uniform(0.35, 0.42), rng.uniform(0.35, 0.45), rng.uniform(-0.4, -0.3))
        kidneys.append(_random_blob(rng, centre, (0.35 * sz, 0.15 * s, 0.2 * s), torso.rotation))
    liver_centre = torso.point(rng.uniform(-0.35, -0.25), rng.uniform(-0.15, -0.05), rng.uniform(-0.05, 0.05))
    return _random_blob(rng, liver_centre, (0.55 * sz, 0.55 * s, 0.65 * s), torso.rotation), kidneys


def _anatomy(torso: _Torso, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, ...]:
    """Bool masks (body, fat, lung, bone) over ``box`` (z, y, x slices with explicit z start/stop)."""
    zs, ys, xs = box
    z = (np.arange(zs.start, zs.stop) * torso.spacing[0]).astype(np.float32)[:, None, None]
    amplitude, wavelength, phase = torso.width_wave
    width = 1 + amplitude * np.sin(2 * np.pi * z / wavelength + phase)
    rho = torso.rho[ys, xs]
    body = rho <= width
    fat = body & (rho > width - torso.fat)
    period, offset, disc = torso.vertebra
    bone = body & torso.spine[ys, xs] & (np.mod(z - offset, period) >= disc)
    lung = body & ~fat & ~bone & (z > torso.lung_base[ys, xs])
    return body, fat, lung, bone


def _dot(row: np.ndarray, grid: tuple[np.ndarray, ...]) -> np.ndarray:
    """``row . (z, y, x)`` over the broadcast open ``grid``."""
    return row[0] * grid[0] + row[1] * grid[1] + row[2] * grid[2]


def _rasterize(blob: _Blob, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """``(box, member)``: membership (bool, box-shaped) of ``blob``, centred on a voxel, in its bounding box."""
    centre = np.round(blob.centre / spacing) * spacing
    reach = np.abs(blob.rotation).T @ (blob.semi * (1 + blob.amp))
    lo = np.clip(np.floor((centre - reach) / spacing), 0, shape).astype(int)
    hi = np.clip(np.ceil((centre + reach) / spacing) + 1, 0, shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    offsets = [
        (np.arange(a, b) * step - c).astype(np.float32) for a, b, step, c in zip(lo, hi, spacing, centre, strict=True)
    ]
    grid = (offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :])
    to_local = (blob.rotation / blob.semi[:, None]).astype(np.float32)  # rows: world offset -> local / semi
    r2 = sum(_dot(row, grid) ** 2 for row in to_local)
    waves = (blob.waves @ to_local).astype(np.float32)
    field = sum(np.cos(_dot(row, grid) + np.float32(phase)) for row, phase in zip(waves, blob.phases, strict=True))
    return box, r2 <= (1 + np.float32(blob.amp / len(waves)) * field) ** 2


def _paint_anatomy(image: np.ndarray, torso: _Torso, hu: dict[str, float]) -> None:
    """Fill ``image`` (z, y, x) with air, body tissue, fat, lungs and bone, slab by slab."""
    for start in range(0, image.shape[0], CHUNK):
        box = (slice(start, min(start + CHUNK, image.shape[0])), slice(None), slice(None))
        body, fat, lung, bone = _anatomy(torso, box)
        slab = image[box[0]]
        slab[:] = np.where(body, np.float32(hu["tissue"]), np.float32(hu["air"]))
        for mask, name in ((fat, "fat"), (lung, "lung"), (bone, "bone")):
            slab[mask] = hu[name]


def _paint(image, label, blob: _Blob, torso: _Torso, hu: float, cls: int, allowed: tuple[int, ...]) -> None:
    """Set ``blob`` voxels whose label is in ``allowed`` and that are inside the body, not fat, lung or bone."""
    box, member = _rasterize(blob, image.shape, torso.spacing)
    body, fat, lung, bone = _anatomy(torso, box)
    member &= body & ~fat & ~lung & ~bone & np.isin(label[box], allowed)
    image[box][member] = hu
    label[box][member] = cls


def _lesion_centre(rng: np.random.Generator, liver: _Blob, label: np.ndarray, spacing) -> np.ndarray | None:
    """A liver voxel centre (mm) in the liver's core, if possible one whose 26 neighbours are liver too."""
    for _ in range(32):
        direction = rng.normal(size=3)
        local = liver.semi * direction / np.linalg.norm(direction) * rng.uniform(0, 0.6)
        index = np.round((liver.centre + liver.rotation.T @ local) / spacing).astype(int)
        inside = np.all(index >= 1) and np.all(index < np.subtract(label.shape, 1))
        if inside and np.all(label[tuple(slice(i - 1, i + 2) for i in index)] == 1):
            return index * spacing
    candidates = np.argwhere(label == 1)
    return candidates[rng.integers(len(candidates))] * spacing if len(candidates) else None


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(2 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _blur_along(volume: np.ndarray, axis: int, kernel: np.ndarray) -> np.ndarray:
    """New array: ``volume`` convolved along ``axis`` with the symmetric ``kernel``, edges replicated."""
    source = np.moveaxis(volume, axis, 0)
    radius = len(kernel) // 2
    out = source * kernel[radius]
    for d in range(1, radius + 1):
        out[d:] += kernel[radius + d] * source[:-d]
        out[:-d] += kernel[radius + d] * source[d:]
        out[:d] += kernel[radius + d] * source[:1]
        out[-d:] += kernel[radius + d] * source[-1:]
    return np.moveaxis(out, 0, axis)


def _blur_and_noise(image: np.ndarray, spacing, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """int16 (z, y, x): ``image`` with partial-volume blur (0.5 voxel, 0.7 on axes >= 1.5x coarser) and noise."""
    kernels = [_gaussian_kernel(0.7 if step >= 1.5 * min(spacing) else 0.5) for step in spacing]
    for start in range(0, image.shape[0], CHUNK):
        slab = image[start : start + CHUNK]
        slab[:] = _blur_along(_blur_along(slab, 1, kernels[1]), 2, kernels[2])
    out = np.empty(image.shape, np.int16)
    for start in range(0, image.shape[1], CHUNK):
        block = _blur_along(image[:, start : start + CHUNK], 0, kernels[0])
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(noise_std)
        out[:, start : start + CHUNK] = np.clip(np.rint(block), -32768, 32767)
    return out


def _check_shape(shape) -> tuple[int, int, int]:
    values = tuple(shape) if isinstance(shape, Sequence | np.ndarray) else ()
    integers = all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= MIN_SIDE for v in values)
    if len(values) != 3 or not integers:
        raise ValueError(f"shape must be 3 positive ints (z, y, x), each >= {MIN_SIDE}; got {shape!r}")
    return tuple(int(v) for v in values)


def _check_spacing(spacing) -> tuple[float, float, float]:
    values = tuple(spacing) if isinstance(spacing, Sequence | np.ndarray) and not isinstance(spacing, str) else ()
    numeric = all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in values)
    if len(values) != 3 or not numeric or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be 3 positive finite floats (z, y, x) in mm; got {spacing!r}")
    return tuple(float(v) for v in values)


def make_phantom(
    shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image, label): image int16 Hounsfield units (z, y, x), label uint8 (z, y, x) with values 0..3.

    ``shape`` is in voxels (z, y, x), each >= 8; ``spacing`` in mm (z, y, x). The same ``seed`` (an int or a
    sequence such as ``(seed, case_index)``) gives the same phantom. Label values index ``SYNTH_CLASS_NAMES``.
    """
    shape, spacing = _check_shape(shape), _check_spacing(spacing)
    rng = np.random.default_rng(seed)
    hu = {name: mean + rng.uniform(-1, 1) * HU_JITTER.get(name, 5) for name, mean in MEAN_HU.items()}
    torso = _make_torso(rng, shape, spacing)
    liver, kidneys = _organ_blobs(rng, torso)
    image = np.empty(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    _paint_anatomy(image, torso, hu)
    for kidney in kidneys:
        _paint(image, label, kidney, torso, hu["kidney"], 2, (0,))
    _paint(image, label, liver, torso, hu["liver"], 1, (0,))
    for _ in range(rng.integers(1, 4)):
        centre = _lesion_centre(rng, liver, label, spacing)
        if centre is not None:
            radius = min(rng.uniform(2.5, 7.5), 0.3 * liver.semi.min())
            lesion = _random_blob(rng, centre, np.full(3, radius), np.eye(3), tilt=np.pi)
            _paint(image, label, lesion, torso, hu["lesion"], 3, (1, 3))
    return _blur_and_noise(image, spacing, rng.uniform(10, 20), rng), label
