"""Gaussian-weighted sliding-window prediction of a whole volume with a patch-trained network."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.host_memory import KEPT_BLOCK_BYTES, freed_memory_kept
from iunet3d.infer.accumulator import block_regions
from iunet3d.infer.windows import gaussian_importance, window_grid
from iunet3d.models.orthogonal import matrices_computed_once


class SlidingWindowPredictor:
    """Runs ``network`` over overlapping windows of a volume and blends them into an accumulator.

    network: (B, 1, *patch_size) -> (B, K, *patch_size). Windows overlap by ``overlap`` of the patch,
    each window's output is weighted by a Gaussian (sigma = patch * ``sigma_scale``), ``batch_size``
    windows go through the network together, and with ``mirror`` each batch is also predicted mirrored
    along every combination of axes (8 passes) and the outputs are averaged (test-time augmentation).
    With ``read_ahead`` a reader thread reads and normalises the next batch while the network runs; without
    it, each batch is read in the calling thread just before its forward pass. Default (None): read ahead
    when the network runs on an accelerator, whose host threads are otherwise idle during the forward pass;
    not on the CPU, where the reader competes with torch's own threads (measured on 2 cores, 48x256x256,
    median of 3: 15.64 s with the reader, 15.06 s without).

    With ``channels_last`` (default) the network runs in channels-last (NDHWC) order: a copy of it whose
    convolution weights are stored that way (unless they are already), so that every activation is; oneDNN
    and cuDNN then convolve without reordering. On 2 CPU cores with a 16-channel demo network a batch took
    0.85x the time of the contiguous layout when frozen (about 0.92x eager). The caller's network is never
    changed.

    With ``read_slabs`` (default) the image is read one z position of windows at a time: the rows
    (patch depth, whole y-x plane) are read and normalised once and the windows at that z are cut from
    them, so each stored chunk is decompressed once per z position instead of once per window it overlaps
    (on a 96x256x256 int16 store with 32x64x64 chunks: 0.06 s for all rows against 1.0 s window by window).
    The rows are ``memory_plan.input_slab_bytes``. Without it (e.g. for a resampled view, interpolated per region),
    each window is read on its own.

    With ``freeze`` the network runs as a TorchScript trace at the batch's shape, frozen: its weights and
    orthogonal matrices become constants and the Python of its many small layers (module calls, autocast
    guards, slicing) is gone; batches of another shape (the last one) run the network itself. Default
    (None): on the CPU in float32 when the prediction makes at least ``FREEZE_MIN_FORWARDS`` forward passes,
    since tracing costs about a second; measured on 2 cores with a 16-channel demo network: 0.82x the time
    per batch. A network that cannot be traced runs as it is.

    With ``keep_freed_memory`` the C allocator keeps freed blocks up to ``ACTIVATIONS_PER_INPUT`` times a
    batch's input (at most 16 MB; ``freed_memory_kept``) during the loop: a batch's activations, reused by
    the next. On 2 CPU cores that made a 96x256x256 prediction 10-25% faster. It sets the allocator's
    thresholds for the rest of the process, so only a caller that owns its process asks for it (the
    ``iunet3d predict`` command does; validation inside training does not). What is kept is the memory of
    the network's activations, which a memory limit does not cover (``plan_memory``): capping it by the
    limit's headroom (80 MB for a 96x256x256 volume) let glibc hand it back again (1.8 million faults).
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: Sequence[int],
        *,
        overlap: float = 0.5,
        batch_size: int = 2,
        mirror: bool = False,
        sigma_scale: float = 1 / 8,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
        read_ahead: bool | None = None,
        channels_last: bool = True,
        read_slabs: bool = True,
        freeze: bool | None = None,
        keep_freed_memory: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        self.network, self.patch_size = network, tuple(patch_size)
        self.overlap, self.batch_size, self.mirror = overlap, batch_size, mirror
        self.importance = gaussian_importance(self.patch_size, sigma_scale)
        self.device, self.autocast_dtype, self.progress = torch.device(device), autocast_dtype, progress
        #: read the next batch in a reader thread while the network runs
        self.read_ahead = self.device.type != "cpu" if read_ahead is None else read_ahead
        self.channels_last = channels_last
        #: read each z position's rows (patch depth x the whole y-x plane) once, cut its windows from them
        self.read_slabs = read_slabs
        #: run a frozen TorchScript trace of the network (``frozen_for_inference``); None: decided per prediction
        self.freeze = freeze
        #: the largest freed blocks the loop keeps for reuse (``freed_memory_kept``): a batch's activations;
        #: 0 without ``keep_freed_memory``
        batch_input = 4 * batch_size * math.prod(self.patch_size)
        self.kept_block_bytes = min(KEPT_BLOCK_BYTES, ACTIVATIONS_PER_INPUT * batch_input) if keep_freed_memory else 0

    def predict(self, image, accumulator, normalize: Callable[[np.ndarray], np.ndarray] | None = None):
        """Blend the network's output over ``image`` (D, H, W; numpy or Zarr, read window by window) into
        ``accumulator`` (whose shape is the image's) and return it. ``normalize`` maps raw windows
        (e.g. HU) to network input; it must not depend on the window (``CTNormalization`` does not).

        Windows are placed by ``window_grid`` (evenly spaced from 0 to ``size - patch`` per axis, z-major
        order) and go through the network ``batch_size`` at a time. A reader thread reads and normalises the
        next batch (B, *patch) while the network runs on the current one; an error it raises (e.g. a
        corrupted chunk of ``image``) reaches the caller unchanged. Under ``torch.inference_mode`` the
        network's learned orthogonal matrices are computed once per prediction instead of once per forward
        (``matrices_computed_once``): the same values, so the same outputs. An accumulator with a ``device``
        (``RowAccumulator`` holding its rows there) gets the outputs and weights as tensors on that device
        (no copy when it is the prediction device), so that on an accelerator they never leave it; any other
        gets numpy arrays. With ``keep_freed_memory`` the C allocator keeps freed memory during the loop
        (``freed_memory_kept``), so that each batch's activations reuse pages already mapped, and hands it
        back at the end.
        """
        shape = tuple(image.shape)
        if tuple(accumulator.shape) != shape:
            raise ValueError(f"accumulator shape {accumulator.shape} differs from the image's {shape}")
        starts = window_grid(shape, self.patch_size, self.overlap)
        batches = [starts[i : i + self.batch_size] for i in range(0, len(starts), self.batch_size)]
        progress = None
        if self.progress:
            from tqdm import tqdm

            progress = tqdm(total=len(batches), desc="windows", unit="batch", leave=False)
        was_training = self.network.training
        self.network.eval()
        network = inference_network(self.network, self.channels_last)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iunet3d-windows") if self.read_ahead else None
        pending = None
        accumulator_device = getattr(accumulator, "device", None)  # one that adds tensors where they are
        weights = (
            self.importance if accumulator_device is None else torch.from_numpy(self.importance).to(accumulator_device)
        )
        try:
            with matrices_computed_once(network), freed_memory_kept(self.kept_block_bytes):
                frozen = None  # traced at the first batch's shape, which every batch but maybe the last has
                if batches and self._freezes(len(batches)):
                    example = torch.zeros(len(batches[0]), 1, *self.patch_size, device=self.device)
                    frozen = frozen_for_inference(network, example)
                source = _SlabWindows(image, shape, self.patch_size, normalize) if self.read_slabs else None
                read = functools.partial(self._read_batch, image, shape, normalize, source)
                pending = reader.submit(read, batches[0]) if batches and reader is not None else None
                for index, batch in enumerate(batches):
                    if reader is None:
                        windows = read(batch)
                    else:
                        windows = pending.result()  # re-raises the reader's error as it was raised
                        pending = reader.submit(read, batches[index + 1]) if index + 1 < len(batches) else None
                    use_frozen = frozen is not None and len(batch) == len(batches[0])
                    outputs = self._run(frozen if use_frozen else network, torch.from_numpy(windows)[:, None],
                                        accumulator_device)  # fmt: skip
                    for start, output in zip(batch, outputs, strict=True):
                        crop = _inside(start, self.patch_size, shape)
                        accumulator.add(start, output[(slice(None), *crop)], weights[crop])
                    if progress is not None:
                        progress.update()
        finally:
            if pending is not None:
                pending.cancel()
            if reader is not None:
                reader.shutdown(wait=True)
            self.network.train(was_training)
            if progress is not None:
                progress.close()
        return accumulator

    def _freezes(self, batches: int) -> bool:
        if self.freeze is not None:
            return self.freeze
        forwards = batches * (8 if self.mirror else 1)
        return self.device.type == "cpu" and self.autocast_dtype is None and forwards >= FREEZE_MIN_FORWARDS

    def _read_batch(self, image, shape, normalize, slabs: _SlabWindows | None, batch) -> np.ndarray:
        """(B, *patch) float32: the normalised windows at the starts in ``batch``."""
        windows = np.empty((len(batch), *self.patch_size), np.float32)
        for window, start in zip(windows, batch, strict=True):
            window[...] = slabs.window(start) if slabs is not None else self._read(image, start, shape, normalize)
        return windows

    def _read(self, image, start, shape, normalize) -> np.ndarray:
        """The window at ``start``, padded to the patch size where the volume is smaller: with the image's
        ``fill_value`` when it has one (e.g. a ``ResampledVolume``, already normalised), else air in HU."""
        region = tuple(slice(s, min(s + p, size)) for s, p, size in zip(start, self.patch_size, shape, strict=True))
        window = np.asarray(image[region])
        padding = [(0, p - n) for p, n in zip(self.patch_size, window.shape, strict=True)]
        if any(after for _, after in padding):
            window = np.pad(window, padding, constant_values=getattr(image, "fill_value", IMAGE_FILL_HU))
        window = normalize(window) if normalize is not None else window
        return np.asarray(window, dtype=np.float32)

    @torch.inference_mode()
    def _run(
        self, network: nn.Module, windows: torch.Tensor, to: torch.device | None = None
    ) -> np.ndarray | torch.Tensor:
        """(B, 1, *patch) -> (B, K, *patch) float32, averaged over mirrorings when ``mirror``: numpy, or a
        tensor on device ``to`` (from the prediction device: no copy when it is the same)."""
        windows = windows.to(self.device)
        flips = [()]
        if self.mirror:
            flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)]
        total = None
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        for axes in flips:
            with autocast:
                output = network(windows.flip(axes) if axes else windows).float()
            output = output.flip(axes) if axes else output
            total = output if total is None else total.add_(output)
        if len(flips) > 1:
            total /= len(flips)
        return total.cpu().numpy() if to is None else total.to(to)


class _SlabWindows:
    """Windows cut from the rows of one z position at a time: ``image[z : z + patch_z]`` over the whole y-x
    plane, padded to at least the patch (with the image's ``fill_value`` if it has one, else air in HU)
    and normalised once; read again only when the windows (z-major) move to another z."""

    def __init__(self, image, shape, patch, normalize):
        self.image, self.shape, self.patch, self.normalize = image, tuple(shape), tuple(patch), normalize
        self.z: int | None = None
        self.rows: np.ndarray | None = None  #: (patch_z, max(H, patch_y), max(W, patch_x)) float32

    def window(self, start) -> np.ndarray:
        """(patch) float32: the normalised window at ``start`` (z, y, x)."""
        if start[0] != self.z:
            self.rows = None  # released before the next rows are read
            self.rows, self.z = self._read_rows(start[0]), start[0]
        return self.rows[:, start[1] : start[1] + self.patch[1], start[2] : start[2] + self.patch[2]]

    def _read_rows(self, z: int) -> np.ndarray:
        rows = np.asarray(self.image[z : min(z + self.patch[0], self.shape[0])])
        wanted = (self.patch[0], *(max(n, p) for n, p in zip(self.shape[1:], self.patch[1:], strict=True)))
        padding = [(0, w - n) for w, n in zip(wanted, rows.shape, strict=True)]
        if any(after for _, after in padding):
            rows = np.pad(rows, padding, constant_values=getattr(self.image, "fill_value", IMAGE_FILL_HU))
        rows = self.normalize(rows) if self.normalize is not None else rows
        return np.asarray(rows, dtype=np.float32)


FREEZE_MIN_FORWARDS = 32  #: forward passes from which the default ``freeze`` pays for its trace
#: a batch's largest activations per byte of its input: the demo network's 16 channels at full resolution,
#: two such tensors at a time (measured: 8 MB blocks for a 0.5 MB batch of two 16x64x64 windows)
ACTIVATIONS_PER_INPUT = 32


def frozen_for_inference(network: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule | None:
    """``network`` (eval mode, grad off inside) traced at ``example``'s shape and frozen; None when it cannot
    be traced. Not ``torch.jit.optimize_for_inference``: its oneDNN layout conversion gets the in-place
    coupling updates on channel slices wrong (outputs off by up to 1.7 on a random-weight iUNet).
    TorchScript's freezing is deprecated in favour of ``torch.compile``, whose CPU compilation of this
    network took 50 s for 0.93x the eager time per batch on 2 cores (the trace: about 1 s for 0.82x), so
    its deprecation warnings are silenced here."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.freeze(torch.jit.trace(network, example, check_trace=False))
        except RuntimeError:
            return None


def inference_network(network: nn.Module, channels_last: bool) -> nn.Module:
    """``network`` (in eval mode) as the predictor runs it: with ``channels_last``, a copy whose 5-D weights
    are stored channels-last (NDHWC), unless they already all are (e.g. a network trained that way); else
    ``network`` itself. The copy costs the parameters' memory once per prediction, not per window."""
    weights = [p for p in network.parameters() if p.dim() == 5]
    if not channels_last or all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights):
        return network
    return copy.deepcopy(network).to(memory_format=torch.channels_last_3d)


def _inside(start: Sequence[int], patch: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """The part (z, y, x slices from 0) of the window at ``start`` that lies inside the volume."""
    return tuple(slice(0, min(p, n - s)) for s, p, n in zip(start, patch, shape, strict=True))


FINALIZE_VOXELS = 2**20  #: voxels blended at a time when a block's labels are finalised


def write_labels(accumulator, labels, probabilities=None) -> None:
    """Write ``argmax`` of the blended output into ``labels`` (D, H, W) uint8 and, if given, its softmax
    into ``probabilities`` (K, D, H, W), block by block (numpy or Zarr arrays), each block written once.
    Without probabilities a block's labels are computed a few z slices (about ``FINALIZE_VOXELS``) at a
    time into one uint8 buffer, so the blend and argmax temporaries stay small whatever the block."""
    for region in block_regions(accumulator.shape, accumulator.block):
        if probabilities is not None:
            blended = accumulator.blended(region)
            labels[region] = blended.argmax(axis=0).astype(np.uint8)
            probabilities[(slice(None), *region)] = softmax(blended)
            continue
        z0, z1 = region[0].start, region[0].stop
        plane = (region[1].stop - region[1].start) * (region[2].stop - region[2].start)
        step = max(1, FINALIZE_VOXELS // max(1, plane))
        block = np.empty((z1 - z0, *(r.stop - r.start for r in region[1:])), np.uint8)
        for z in range(z0, z1, step):
            part = (slice(z, min(z + step, z1)), *region[1:])
            block[z - z0 : part[0].stop - z0] = accumulator.blended(part).argmax(axis=0)
        labels[region] = block


class RowLabelWriter:
    """Writes the blended rows a ``RowAccumulator`` hands over (in z order) into ``labels`` (D, H, W) uint8
    and, if given, their softmax into ``probabilities`` (K, D, H, W): the labels are gathered in one uint8
    buffer per ``depth`` z slices (a chunked array's chunk depth) and written once per such block, so that
    no compressed chunk is read back and rewritten; the probabilities are written row by row."""

    def __init__(self, labels, probabilities, depth: int):
        self.labels, self.probabilities, self.depth = labels, probabilities, max(1, depth)
        self.shape = tuple(labels.shape)
        self.buffer: np.ndarray | None = None

    def __call__(self, region: tuple[slice, ...], blended: np.ndarray | torch.Tensor) -> None:
        """Take the blended rows (K, d, H, W) at ``region``: numpy, or a tensor on any device, whose softmax and
        argmax are computed there and only the results copied to the host."""
        if isinstance(blended, torch.Tensor):
            if self.probabilities is not None:
                self.probabilities[(slice(None), *region)] = torch.softmax(blended, 0).cpu().numpy()
            row = blended.argmax(0).to(torch.uint8).cpu().numpy()
        else:
            if self.probabilities is not None:
                self.probabilities[(slice(None), *region)] = softmax(blended)
            row = blended.argmax(axis=0).astype(np.uint8)
        z, stop = region[0].start, region[0].stop
        while z < stop:
            block_start = z // self.depth * self.depth
            block_stop = min(block_start + self.depth, self.shape[0])
            if self.buffer is None:
                self.buffer = np.empty((block_stop - block_start, *self.shape[1:]), np.uint8)
            end = min(stop, block_stop)
            self.buffer[z - block_start : end - block_start] = row[z - region[0].start : end - region[0].start]
            if end == block_stop:
                self.labels[block_start:block_stop] = self.buffer
                self.buffer = None
            z = end


def softmax(blended: np.ndarray) -> np.ndarray:
    """Class probabilities (K, d, h, w) float32 of blended network outputs (K, d, h, w), over axis 0."""
    exponentials = np.exp(blended - blended.max(axis=0, keepdims=True))
    return exponentials / exponentials.sum(axis=0, keepdims=True)
