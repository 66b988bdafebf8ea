"""Sliding-window blending: window placement, Gaussian weights, in-memory vs Zarr-streamed accumulation."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.infer.accumulator import (
    MemoryAccumulator,
    RowAccumulator,
    ZarrAccumulator,
    accumulator_bytes,
    slab_cache_bytes,
)
from iunet3d.infer.memory_plan import plan_memory
from iunet3d.infer.sliding_window import (
    FREEZE_MIN_FORWARDS,
    RowLabelWriter,
    SlidingWindowPredictor,
    frozen_for_inference,
    softmax,
    write_labels,
)
from iunet3d.infer.trained_model import _slabs_fit, predict_volume
from iunet3d.infer.windows import gaussian_importance, window_grid, window_starts
from iunet3d.models.orthogonal import matrices_computed_once

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


# --- the speed work changes no result: a frozen copy of the previous algorithm as the oracle ------------------------


def previous_blend(network, image: np.ndarray, patch, overlap: float, batch_size: int, normalize) -> np.ndarray:
    """The blended output (K, D, H, W) as the implementation before the speed work computed it: windows of
    ``window_grid`` read one by one, the network's recorded forward (with autograd: no in-place inference
    pass, contiguous layout, orthogonal matrices recomputed every forward), Gaussian-weighted sums and
    weights in numpy, ``sums / weights``."""
    shape = image.shape
    importance = gaussian_importance(patch)
    starts = window_grid(shape, patch, overlap)
    sums, weights = None, np.zeros(shape, np.float32)
    for i in range(0, len(starts), batch_size):
        batch = starts[i : i + batch_size]
        windows = []
        for start in batch:
            region = tuple(slice(s, min(s + p, n)) for s, p, n in zip(start, patch, shape, strict=True))
            window = image[region]
            padding = [(0, p - n) for p, n in zip(patch, window.shape, strict=True)]
            window = np.pad(window, padding, constant_values=IMAGE_FILL_HU)
            windows.append(np.asarray(normalize(window), np.float32))
        with torch.enable_grad():
            outputs = network(torch.from_numpy(np.stack(windows))[:, None]).detach().float().numpy()
        if sums is None:
            sums = np.zeros((outputs.shape[1], *shape), np.float32)
        for start, output in zip(batch, outputs, strict=True):
            valid = tuple(min(p, n - s) for p, n, s in zip(patch, shape, start, strict=True))
            crop = tuple(slice(0, v) for v in valid)
            region = tuple(slice(s, s + v) for s, v in zip(start, valid, strict=True))
            channels = (slice(None), *region)
            sums[channels] = sums[channels] + output[(slice(None), *crop)] * importance[crop]
            weights[region] = weights[region] + importance[crop]
    return sums / weights


@pytest.fixture
def small_model():
    """A demo-like iUNet (3 classes) whose learned orthogonal matrices are not the identity, as after
    training (a cached matrix of the wrong layer or dtype would change the output)."""
    from iunet3d.data.normalization import CTNormalization
    from iunet3d.infer.trained_model import TrainedModel
    from iunet3d.models.orthogonal import OrthogonalMatrices
    from iunet3d.models.segmentation import SegmentationIUNet

    torch.manual_seed(0)
    network = SegmentationIUNet(1, 3, channels=4, architecture=(1, 1, 1, 1),
                                resampling_stride=[(1, 2, 2), (2, 2, 2), (2, 2, 2)], norm=None)  # fmt: skip
    learned = [m for m in network.modules() if isinstance(m, OrthogonalMatrices) and m.weight is not None]
    assert learned
    with torch.no_grad():
        for layer in learned:
            layer.weight.normal_(0, 0.3)
        for parameter in network.parameters():  # zero-initialised last layers: let the couplings act
            if parameter.abs().max() == 0:
                parameter.normal_(0, 0.1)
    return TrainedModel(network=network.eval(), class_names=["background", "a", "b"], in_channels=1,
                        patch_size=PATCH, normalization=CTNormalization.window(-1000, 1000), step=0,
                        source=Path("random"))  # fmt: skip


@pytest.fixture(scope="module")
def phantom():
    from iunet3d.data.synth import make_phantom

    image, _ = make_phantom((20, 40, 44), (2.5, 0.8, 0.8), seed=3)
    return image


@pytest.mark.slow
def test_labels_and_probabilities_equal_the_previous_implementation_in_memory_and_streamed(small_model, phantom,
                                                                                          tmp_path):  # fmt: skip
    expected = previous_blend(small_model.network, phantom, PATCH, 0.5, 3, small_model.normalization)
    labels = expected.argmax(0)
    assert len(np.unique(labels)) > 1  # not one class everywhere: the comparison means something
    chunks = (8, 16, 16)
    in_memory = np.zeros((3, *phantom.shape), np.float32)
    got = predict_volume(small_model, phantom, batch_size=3, probabilities=in_memory, stream=False)
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(in_memory, softmax(expected), rtol=1e-5, atol=1e-6)
    for limit in (None, 600_000):  # slab cache (no limit), and per-window chunks (a limit it does not fit in)
        streamed = np.zeros((3, *phantom.shape), np.float32)
        plan = plan_memory(3, phantom.shape, PATCH, 3, chunks, True, limit, True)
        assert plan.streamed
        assert _slabs_fit(plan, 3, phantom.shape, PATCH, limit) == (limit is None)
        got = predict_volume(small_model, phantom, batch_size=3, probabilities=streamed, plan=plan, max_memory=limit,
                             scratch=tmp_path)  # fmt: skip
        np.testing.assert_array_equal(got, labels)
        np.testing.assert_allclose(streamed, softmax(expected), rtol=1e-5, atol=1e-6)
    whole = tuple(slice(0, n) for n in phantom.shape)
    for options in (dict(read_ahead=True), dict(read_slabs=False, channels_last=False), dict(freeze=True)):
        predictor = SlidingWindowPredictor(small_model.network, PATCH, overlap=0.5, batch_size=3, **options)
        blended = predictor.predict(phantom, MemoryAccumulator(3, phantom.shape), normalize=small_model.normalization)
        np.testing.assert_allclose(blended.blended(whole), expected, rtol=1e-5, atol=1e-6)
    assert all(p.is_contiguous() for p in small_model.network.parameters())  # the caller's network is unchanged


def test_the_frozen_network_runs_where_it_pays_and_an_untraceable_one_runs_as_it_is(small_model):
    """By default the trace is used on the CPU in float32 from FREEZE_MIN_FORWARDS forward passes; a network
    that cannot be traced is run as it is, with the same blend as without freezing."""
    predictor = SlidingWindowPredictor(small_model.network, PATCH)
    assert not predictor._freezes(FREEZE_MIN_FORWARDS - 1) and predictor._freezes(FREEZE_MIN_FORWARDS)
    assert SlidingWindowPredictor(small_model.network, PATCH, mirror=True)._freezes(FREEZE_MIN_FORWARDS // 8)
    assert not SlidingWindowPredictor(small_model.network, PATCH, autocast_dtype=torch.bfloat16)._freezes(10**6)
    windows = torch.randn(2, 1, *PATCH)
    frozen = frozen_for_inference(small_model.network, windows)
    assert isinstance(frozen, torch.jit.ScriptModule)
    with torch.no_grad():
        torch.testing.assert_close(frozen(windows), small_model.network(windows), rtol=1e-5, atol=1e-5)

    class Untraceable(nn.Module):  # returns a Python float beside the tensor: TorchScript cannot trace it
        def forward(self, x):
            return ScaledCopies()(x) if torch.jit.is_tracing() is False else {"x": x, "scale": 1.0}

    assert frozen_for_inference(Untraceable(), windows) is None
    image = np.random.default_rng(0).normal(size=(12, 20, 20)).astype(np.float32)
    expected = SlidingWindowPredictor(ScaledCopies(), PATCH, freeze=False).predict(
        image, MemoryAccumulator(3, image.shape)
    )
    got = SlidingWindowPredictor(Untraceable(), PATCH, freeze=True).predict(image, MemoryAccumulator(3, image.shape))
    whole = tuple(slice(0, n) for n in image.shape)
    np.testing.assert_array_equal(got.blended(whole), expected.blended(whole))


def test_the_orthogonal_matrices_are_computed_as_before_after_a_prediction(small_model, phantom):
    from iunet3d.models.orthogonal import OrthogonalMatrices

    layers = [m for m in small_model.network.modules() if isinstance(m, OrthogonalMatrices) and m.weight is not None]
    before = [layer().detach().clone() for layer in layers]
    predict_volume(small_model, phantom[:8, :16, :16])
    assert all(layer._once is None for layer in layers)  # computed at every call again
    with torch.no_grad():
        layers[0].weight[..., 0, 1] += 0.5  # a changed parameter is seen: nothing stays cached
    try:
        assert not torch.allclose(layers[0](), before[0])
        assert layers[0]().requires_grad  # autograd goes through it again
        with matrices_computed_once(small_model.network), torch.no_grad():
            first = layers[0]()
            assert layers[0]() is first  # computed once inside, without grad
            with torch.enable_grad():
                assert layers[0]() is not first and layers[0]().requires_grad  # with grad: every call
    finally:
        with torch.no_grad():
            layers[0].weight[..., 0, 1] -= 0.5


@pytest.mark.parametrize("order", ["z-major", "reversed"])
def test_the_slab_cache_blends_like_memory_in_any_window_order(tmp_path, order):
    """Windows added in z-major order (each chunk row written once) or backwards (rows read back from the
    store and written again) give the in-memory accumulator's blend."""
    shape, patch = (21, 19, 23), (8, 16, 16)
    rng = np.random.default_rng(2)
    starts = window_grid(shape, patch, 0.5)
    starts = starts[::-1] if order == "reversed" else starts
    memory = MemoryAccumulator(2, shape)
    slabs = ZarrAccumulator(tmp_path / "acc.zarr", 2, shape, chunk=(4, 8, 8), slabs=True)
    weight = gaussian_importance(patch)
    for start in starts:
        output = rng.normal(size=(2, *patch)).astype(np.float32)
        crop = tuple(slice(0, min(p, n - s)) for s, p, n in zip(start, patch, shape, strict=True))
        for accumulator in (memory, slabs):
            accumulator.add(start, output[(slice(None), *crop)], weight[crop])
    assert len(slabs._rows) <= 3  # never more chunk rows than one window covers
    np.testing.assert_allclose(blended(slabs), blended(memory), rtol=1e-6, atol=1e-6)
    assert slab_cache_bytes(2, shape, patch, (4, 8, 8)) == 4 * 3 * 12 * 19 * 23


@pytest.mark.parametrize("depth, device", [(4, None), (3, None), (30, None), (3, "cpu")])
def test_the_row_accumulator_hands_over_each_row_blended_once_in_z_order(depth, device):
    """Rows are handed over as soon as the windows (z-major) move past them, blended exactly as in memory,
    each once and in order, holding no more rows than one window covers; a window reaching a row already
    handed over is refused. With a ``device`` the rows are tensors there (numpy otherwise)."""
    shape, patch = (21, 19, 23), (8, 16, 16)
    rng = np.random.default_rng(5)
    memory = MemoryAccumulator(2, shape)
    handed: list[tuple[tuple[slice, ...], np.ndarray, int]] = []

    def take(region, values):
        assert isinstance(values, np.ndarray if device is None else torch.Tensor)
        handed.append((region, np.array(values), z_now))

    rows = RowAccumulator(2, shape, depth, take, device=device)
    as_given = np.asarray if device is None else torch.from_numpy
    weight = gaussian_importance(patch)
    held = 0
    for start in window_grid(shape, patch, 0.5):
        z_now = start[0]
        output = rng.normal(size=(2, *patch)).astype(np.float32)
        crop = tuple(slice(0, min(p, n - s)) for s, p, n in zip(start, patch, shape, strict=True))
        memory.add(start, output[(slice(None), *crop)], weight[crop])
        rows.add(start, as_given(output)[(slice(None), *crop)], as_given(weight)[crop])
        held = max(held, len(rows._rows))
    z_now = None
    rows.finish()
    assert held <= -(-patch[0] // depth) + 1
    assert [region[0] for region, _, _ in handed] == [slice(z, min(z + depth, shape[0])) for z in range(0, 21, depth)]
    assert any(when is not None for _, _, when in handed) or depth >= shape[0]  # some rows before the end
    for region, values, when in handed:
        assert when is None or when >= region[0].stop  # handed over only once the windows moved past it
        np.testing.assert_allclose(values, memory.blended(region), rtol=1e-6, atol=1e-6)
    late = RowAccumulator(2, (16, 16, 16), 4, lambda region, values: None)
    ones = np.ones((2, 8, 16, 16), np.float32)
    late.add((0, 0, 0), ones, weight)
    late.add((8, 0, 0), ones, weight)  # finishes rows 0-1 (z 0:8)
    with pytest.raises(ValueError, match="z=0: its rows were already finished"):
        late.add((0, 0, 0), ones, weight)


def test_rows_held_as_tensors_give_the_labels_and_probabilities_of_numpy_rows(small_model, phantom):
    """Rows on a torch device (as on an accelerator: outputs, weights, blend, softmax and argmax stay there;
    here the CPU) give the labels and probabilities of the numpy rows."""
    results = []
    for device in (None, "cpu"):
        labels, probabilities = np.zeros(phantom.shape, np.uint8), np.zeros((3, *phantom.shape), np.float32)
        rows = RowAccumulator(3, phantom.shape, 4, RowLabelWriter(labels, probabilities, 8), device=device)
        predictor = SlidingWindowPredictor(small_model.network, PATCH, batch_size=3)
        predictor.predict(phantom, rows, small_model.normalization)
        rows.finish()
        results.append((labels, probabilities))
    (labels, probabilities), (device_labels, device_probabilities) = results
    assert len(np.unique(labels)) > 1 and probabilities.min() >= 0 and probabilities.sum(0).min() > 0.99
    np.testing.assert_array_equal(device_labels, labels)
    np.testing.assert_allclose(device_probabilities, probabilities, rtol=1e-5, atol=1e-6)


def test_a_corrupted_chunk_read_by_the_reader_thread_fails_as_reading_it_directly(small_model, tmp_path):
    """The reader thread's error reaches the caller unchanged: the one-line DataError naming the case."""
    from iunet3d.data import open_dataset
    from iunet3d.data.errors import DataError
    from iunet3d.data.storage import StorageOptions
    from iunet3d.data.synth import make_phantom
    from iunet3d.infer.prediction_job import _CaseArray
    from tests.helpers.data import store_case

    image, label = make_phantom((24, 48, 48), (2.5, 0.8, 0.8), seed=1)
    store_case(tmp_path / "ds", "broken", image, label, options=StorageOptions(chunk=16, coarse_chunk=8))
    chunks = sorted(p for p in (tmp_path / "ds" / "broken" / "0" / "c").rglob("*") if p.is_file())
    assert len(chunks) > 1
    chunks[-1].write_bytes(b"garbage" * 100)  # the last chunk: read after the first batches went through
    case = open_dataset(tmp_path / "ds").case("broken")
    wrapped = _CaseArray(case.image_array, case, "image")
    expected = None
    for z in sorted({start[0] for start in window_grid(image.shape, PATCH, 0.5)}):  # the first rows that fail
        try:
            wrapped[z : min(z + PATCH[0], image.shape[0])]  # the predictor reads one z position's rows at a time
        except DataError as error:
            expected = str(error)
            break
    assert expected is not None and z != 0 and "\n" not in expected
    with pytest.raises(DataError) as raised:  # on the CPU: read in the calling thread
        predict_volume(small_model, wrapped, batch_size=2)
    assert type(raised.value) is DataError and str(raised.value) == expected
    predictor = SlidingWindowPredictor(small_model.network, PATCH, batch_size=2, read_ahead=True)
    assert predictor.read_ahead and not SlidingWindowPredictor(small_model.network, PATCH).read_ahead
    with pytest.raises(DataError) as raised:  # in the reader thread (the default on an accelerator)
        predictor.predict(wrapped, MemoryAccumulator(3, image.shape), normalize=small_model.normalization)
    assert type(raised.value) is DataError and str(raised.value) == expected
    assert "case broken: reading its image" in expected and "the store may be corrupted" in expected
    assert not [t for t in threading.enumerate() if t.name.startswith("iunet3d-windows")]  # the reader has ended


def test_freed_memory_is_kept_only_when_asked_and_for_activation_sized_blocks():
    """Keeping freed memory sets the process's allocator thresholds, so only a caller that owns its process
    asks (``iunet3d predict``); the blocks kept scale with the batch (at most KEPT_BLOCK_BYTES)."""
    from iunet3d.host_memory import KEPT_BLOCK_BYTES
    from iunet3d.infer.sliding_window import ACTIVATIONS_PER_INPUT

    assert SlidingWindowPredictor(ScaledCopies(), (16, 64, 64)).kept_block_bytes == 0
    small = SlidingWindowPredictor(ScaledCopies(), (8, 16, 16), batch_size=2, keep_freed_memory=True)
    assert small.kept_block_bytes == ACTIVATIONS_PER_INPUT * 4 * 2 * 8 * 16 * 16
    large = SlidingWindowPredictor(ScaledCopies(), (64, 128, 128), batch_size=2, keep_freed_memory=True)
    assert large.kept_block_bytes == KEPT_BLOCK_BYTES
