"""Sliding-window blending: window placement, Gaussian weights, in-memory vs Zarr-streamed accumulation."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from iunet3d.infer.accumulator import MemoryAccumulator, ZarrAccumulator, accumulator_bytes
from iunet3d.infer.sliding_window import SlidingWindowPredictor, write_labels
from iunet3d.infer.windows import gaussian_importance, window_starts

PATCH = (8, 16, 16)


class ScaledCopies(nn.Module):
    """(B, 1, *S) -> (B, 3, *S): the input times 1, 2 and -1 (an identity-like "network")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 2 * x, -x], dim=1)


def blended(accumulator) -> np.ndarray:
    out = np.zeros((accumulator.num_classes, *accumulator.shape), np.float32)
    for region, values in accumulator.blocks():
        out[(slice(None), *region)] = values
    return out


@pytest.mark.parametrize("size, patch, overlap", [(37, 16, 0.5), (16, 16, 0.5), (5, 16, 0.5), (100, 16, 0.0),
                                                  (41, 16, 0.75)])  # fmt: skip
def test_windows_start_at_0_end_at_the_border_and_overlap_at_least_as_asked(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - patch, 0)
    steps = np.diff(starts)
    assert all(0 < step <= max(1, int(patch * (1 - overlap))) for step in steps)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start : start + patch] = True
    assert covered.all()


def test_the_gaussian_peaks_in_the_centre_and_is_never_zero():
    weights = gaussian_importance(PATCH)
    assert weights.shape == PATCH and weights.dtype == np.float32
    assert weights.max() == 1 and weights.min() > 0
    assert weights[4, 8, 8] > weights[0, 8, 8] > weights[0, 0, 0]
    assert np.allclose(weights, weights[::-1, ::-1, ::-1], atol=1e-3)  # symmetric about the centre


@pytest.mark.parametrize("shape", [(13, 37, 41), (8, 16, 16), (5, 10, 12), (20, 16, 50)])
@pytest.mark.parametrize("mirror", [False, True])
def test_an_identity_like_model_is_reproduced_through_the_blending(shape, mirror):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    predictor = SlidingWindowPredictor(ScaledCopies(), PATCH, overlap=0.5, batch_size=3, mirror=mirror)
    accumulator = predictor.predict(image, MemoryAccumulator(3, shape))
    assert accumulator.weights.min() > 0  # every voxel is covered with a positive weight
    out = blended(accumulator)
    np.testing.assert_allclose(out[0], image, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], 2 * image, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], -image, rtol=1e-5, atol=1e-6)


def test_overlapping_windows_are_weighted_towards_their_centres():
    """A network whose output is the window's start z: the blend at a voxel is a weighted mean of the
    windows covering it, and the nearer window centre counts more."""

    class StartOf(nn.Module):
        def forward(self, x):
            return x[:, :1, :1, :1, :1].expand(-1, 1, *x.shape[2:]).clone()

    image = np.broadcast_to(np.arange(16, dtype=np.float32)[:, None, None], (16, 16, 16)).copy()
    out = blended(
        SlidingWindowPredictor(StartOf(), PATCH, overlap=0.5).predict(image, MemoryAccumulator(1, image.shape))
    )
    starts = window_starts(16, 8, 0.5)  # 0, 4, 8: windows [0, 8), [4, 12), [8, 16)
    assert starts == [0, 4, 8]
    assert out[0, 0, 8, 8] == pytest.approx(0.0) and out[0, 15, 8, 8] == pytest.approx(8.0)
    assert 0 < out[0, 5, 8, 8] < 2  # covered by windows 0 and 4; nearer the centre of window 0 (z = 3.5)


@pytest.mark.parametrize("shape", [(13, 37, 41), (24, 32, 32)])
def test_streaming_through_zarr_equals_accumulating_in_memory(tmp_path, shape):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv3d(4, 4, 1))
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    predictor = SlidingWindowPredictor(network, PATCH, overlap=0.5, batch_size=2)
    memory = predictor.predict(image, MemoryAccumulator(4, shape))
    streamed = predictor.predict(image, ZarrAccumulator(tmp_path / "acc.zarr", 4, shape, chunk=(8, 16, 16)))
    np.testing.assert_allclose(blended(streamed), blended(memory), rtol=1e-5, atol=1e-6)
    labels_memory, labels_streamed = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    probabilities = np.zeros((4, *shape), np.float32)
    write_labels(memory, labels_memory, probabilities)
    write_labels(streamed, labels_streamed)
    assert np.array_equal(labels_memory, labels_streamed)
    assert np.array_equal(labels_memory, blended(memory).argmax(0)) and len(np.unique(labels_memory)) > 1
    np.testing.assert_allclose(probabilities.sum(0), 1, rtol=1e-5)


@pytest.mark.slow
def test_streaming_keeps_peak_memory_bounded_by_the_window_not_the_volume(tmp_path):
    """Peak memory allocated through numpy/zarr (tracemalloc) while predicting and writing the labels of a
    volume whose in-memory accumulator would take 84 MB: the streamed one stays below a quarter of that
    (about twice the chunks one window overlaps: read, then written back)."""
    shape, classes = (64, 256, 256), 4
    needed = accumulator_bytes(classes, shape)
    predictor = SlidingWindowPredictor(nn.Conv3d(1, classes, 1), (16, 64, 64), overlap=0.5, batch_size=2)
    image, labels = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    tracemalloc.start()
    try:
        accumulator = ZarrAccumulator(tmp_path / "acc.zarr", classes, shape, chunk=(16, 64, 64))
        write_labels(predictor.predict(image, accumulator), labels)
        _, streaming_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert needed == 4 * 5 * 64 * 256 * 256
    assert streaming_peak < needed / 4, (streaming_peak, needed)
