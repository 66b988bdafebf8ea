"""MONAI's ``sliding_window_inference`` on the benchmark's network and volume (``iunet3d bench predict --against
monai``), and the agreement of our blended probabilities with MONAI's.

The MONAI side reads the whole phantom (D, H, W) int16 from its Zarr store into memory, normalises it with
the model's ``CTNormalization``, and runs ``sliding_window_inference(x (1, 1, D, H, W), roi_size=patch,
sw_batch_size=batch, overlap=overlap, mode="gaussian", sigma_scale=1/8)`` under ``torch.no_grad()``: MONAI
holds the input (1, 1, D, H, W), the blended output (1, K, D, H, W) and its count map in memory. The argmax
(D, H, W) uint8 is then written into the same kind of label array as ours. All of that is timed.

Window placement: MONAI's windows are ``i * int(patch * (1 - overlap))`` along each axis, the last one moved
back to ``size - patch``; ours (``window_starts``) are evenly spaced between 0 and ``size - patch`` with at
least that overlap. Where ``size - patch`` is a multiple of the step (every benchmark size with the default
16x64x64 windows and overlap 0.5) both place the same windows, which ``same_windows`` checks.

Weights: MONAI's Gaussian is ours up to a constant factor (the same sigma = patch * sigma_scale, centred on
the patch), except that MONAI clamps it from below at 1e-3 where we floor it at its smallest value (about
1e-10 at a 16x64x64 window's corners). Only voxels covered by several windows' far corners, near the
volume's border, see the difference: ``max_prob_diff`` is between our probabilities and MONAI's own
Gaussian blending; ``max_prob_diff_same_weights`` gives MONAI our weights clamped at 1e-3 (and us the same
weights), which isolates the blending arithmetic (float rounding only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

MONAI_SIGMA_SCALE = 0.125
MONAI_WEIGHT_FLOOR = 1e-3  #: compute_importance_map's lower clamp


def monai_windows(shape, patch, overlap: float) -> list[tuple[int, ...]]:
    """The window starts (z, y, x) MONAI's ``sliding_window_inference`` uses for ``shape``."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    interval = _get_scan_interval(tuple(shape), tuple(patch), len(shape), (overlap,) * len(shape))
    return sorted(tuple(s.start for s in slices) for slices in dense_patch_slices(tuple(shape), tuple(patch), interval))


def monai_blended(network, normalized: np.ndarray, args: argparse.Namespace, weights=None) -> torch.Tensor:
    """MONAI's blended output (K, D, H, W) float32 of the normalised volume (D, H, W)."""
    from monai.inferers import sliding_window_inference

    inputs = torch.from_numpy(np.ascontiguousarray(normalized, np.float32))[None, None]
    with torch.no_grad():
        output = sliding_window_inference(inputs, roi_size=tuple(args.patch), sw_batch_size=args.batch_size,
                                          predictor=network, overlap=args.overlap, mode="gaussian",
                                          sigma_scale=MONAI_SIGMA_SCALE, roi_weight_map=weights)  # fmt: skip
    return output[0]


def monai_predict(model, image, out, args: argparse.Namespace) -> None:
    """Labels (D, H, W) uint8 of the HU ``image`` into ``out``, MONAI's way (the whole volume in memory)."""
    volume = model.normalization(np.asarray(image[...]))
    blended = monai_blended(model.network, volume, args)
    out[...] = blended.argmax(0).to(torch.uint8).numpy()


def probability_agreement(model, image, args: argparse.Namespace) -> dict:
    """Our blended softmax vs MONAI's on the volume's corner of at most 32 x 128 x 128 voxels (K, d, h, w)."""
    from iunet3d.infer.accumulator import MemoryAccumulator
    from iunet3d.infer.sliding_window import SlidingWindowPredictor
    from iunet3d.infer.windows import window_grid

    corner = tuple(min(n, c) for n, c in zip(image.shape, (32, 128, 128), strict=True))
    hu = np.asarray(image[tuple(slice(0, c) for c in corner)])
    classes = len(model.class_names)
    predictor = SlidingWindowPredictor(model.network, args.patch, overlap=args.overlap, batch_size=args.batch_size)

    def ours(importance=None) -> torch.Tensor:
        if importance is not None:
            predictor.importance = importance
        accumulator = predictor.predict(hu, MemoryAccumulator(classes, corner), model.normalization)
        return torch.softmax(torch.from_numpy(accumulator.blended(tuple(slice(0, c) for c in corner))), 0)

    mine = ours()
    theirs = torch.softmax(monai_blended(model.network, model.normalization(hu), args), 0)
    floored = np.maximum(predictor.importance, np.float32(MONAI_WEIGHT_FLOOR))
    mine_floored = ours(floored)
    theirs_floored = torch.softmax(monai_blended(model.network, model.normalization(hu), args,
                                                 torch.from_numpy(floored)), 0)  # fmt: skip
    same = sorted(window_grid(corner, args.patch, args.overlap)) == monai_windows(corner, args.patch, args.overlap)
    return {
        "prob_shape": list(corner), "same_windows_prob": same,
        "max_prob_diff": float((mine - theirs).abs().max()),
        "max_prob_diff_same_weights": float((mine_floored - theirs_floored).abs().max()),
        "labels_agree_prob": float((mine.argmax(0) == theirs.argmax(0)).float().mean()),
    }  # fmt: skip


def measure(args: argparse.Namespace) -> dict:
    """``bench.predict.measure`` for MONAI: warm up on the corner, time one whole-volume prediction, then
    compare the probabilities (outside the clock and the peak)."""
    import gc
    import hashlib
    import shutil
    from pathlib import Path

    from iunet3d.bench.memory import _reset_peak_rss, _rss_mb
    from iunet3d.bench.predict import (
        _Corner,
        build_model,
        create_labels,
        measured_call,
        parse_size,
        size_dir,
    )
    from iunet3d.data.storage import open_volume_array
    from iunet3d.infer.windows import window_grid

    torch.set_num_threads(args.threads)
    shape = parse_size(args.size)
    model = build_model(args)
    where = size_dir(Path(args.dir), shape)
    image = open_volume_array(where / "image.zarr" / "image")
    shutil.rmtree(where / f"scratch-{args.mode}", ignore_errors=True)
    corner = tuple(min(n, p + p // 2) for n, p in zip(shape, args.patch, strict=True))
    warmup_out = create_labels(where / f"warmup-{args.mode}.zarr", corner)
    out = create_labels(where / f"labels-{args.mode}.zarr", shape)
    begin = time.perf_counter()
    monai_predict(model, _Corner(image, corner), warmup_out, args)
    warmup_s = time.perf_counter() - begin
    gc.collect()
    baseline = _rss_mb("VmRSS")
    _reset_peak_rss()
    seconds, cpu_s, faults = measured_call(lambda: monai_predict(model, image, out, args))
    peak = _rss_mb("VmHWM")
    labels = np.asarray(out[...])
    report = {
        "seconds": seconds, "cpu_s": cpu_s, "minor_faults": faults, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
        "streamed": False,
        "warmup_s": warmup_s, "warmup_streamed": False,
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "label_counts": np.bincount(labels.ravel(), minlength=args.classes).tolist(),
        "same_windows": sorted(window_grid(shape, args.patch, args.overlap))
        == monai_windows(shape, args.patch, args.overlap),
    }  # fmt: skip
    return report | probability_agreement(model, image, args)
