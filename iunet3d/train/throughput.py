"""Training metrics between log steps: loss and its terms, gradient norm, throughput and peak memory, reduced
over all ranks."""

from __future__ import annotations

import math
import resource
import time

import torch

from iunet3d.distributed import Distributed


class ThroughputMeter:
    """Over the steps since the last ``collect``, reduced over ranks: the mean loss and its unweighted terms (Dice,
    cross-entropy), the gradient norm before clipping (mean and max; every rank has the same all-reduced
    gradients), patches/s, voxels/s and peak memory."""

    def __init__(self, distributed: Distributed, data, accumulation_steps: int):
        self.distributed = distributed
        self.patches_per_step = data.batch_size * accumulation_steps * distributed.world_size
        self.voxels_per_patch = math.prod(data.patch_size)
        self.loss_sum, self.steps, self.total_steps = 0.0, 0, 0
        self.dice_sum, self.ce_sum, self.grad_norm_sum, self.grad_norm_max = 0.0, 0.0, 0.0, 0.0
        self.started = self.window_started = time.perf_counter()
        self.last: dict = {}

    def add(self, loss: float, terms: dict[str, float] | None = None, grad_norm: torch.Tensor | float = 0.0) -> None:
        """One optimizer step: its loss, its loss ``terms`` ("dice", "ce") and its gradient norm before clipping
        (a scalar tensor stays on its device until ``collect``)."""
        self.loss_sum += loss
        self.dice_sum += (terms or {}).get("dice", 0.0)
        self.ce_sum += (terms or {}).get("ce", 0.0)
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64)
        self.grad_norm_sum = self.grad_norm_sum + grad_norm
        self.grad_norm_max = torch.maximum(torch.as_tensor(self.grad_norm_max, dtype=torch.float64,
                                                           device=grad_norm.device), grad_norm)  # fmt: skip
        self.steps += 1
        self.total_steps += 1

    def collect(self, learning_rate: float) -> dict:
        device = self.distributed.device
        sums = torch.tensor([self.loss_sum, self.steps, self.dice_sum, self.ce_sum], dtype=torch.float64, device=device)
        sums = self.distributed.all_reduce(sums)
        memory = self.distributed.all_reduce(torch.tensor([_peak_memory_mb(device)], device=device), op="max")
        elapsed = time.perf_counter() - self.window_started
        patches_per_s = self.patches_per_step * self.steps / elapsed
        self.last = {
            "train/loss": float(sums[0] / sums[1]),
            "train/loss_dice": float(sums[2] / sums[1]),
            "train/loss_ce": float(sums[3] / sums[1]),
            "train/grad_norm": float(self.grad_norm_sum) / max(self.steps, 1),
            "train/grad_norm_max": _finite_or_inf(float(self.grad_norm_max)),
            "train/lr": learning_rate,
            "perf/patches_per_s": patches_per_s,
            "perf/voxels_per_s": patches_per_s * self.voxels_per_patch,
            "perf/peak_memory_mb": float(memory[0]),
        }
        self.loss_sum, self.steps, self.window_started = 0.0, 0, time.perf_counter()
        self.dice_sum, self.ce_sum, self.grad_norm_sum, self.grad_norm_max = 0.0, 0.0, 0.0, 0.0
        return self.last

    def last_line(self, step: int, steps: int) -> str:
        m = self.last
        return (f"step {step}/{steps}  loss {m['train/loss']:.4f}  grad norm {m['train/grad_norm']:.3g}  "
                f"lr {m['train/lr']:.2e}  "
                f"{m['perf/patches_per_s']:.2f} patches/s  peak memory {m['perf/peak_memory_mb']:.0f} MB")  # fmt: skip

    def totals(self) -> dict:
        elapsed = time.perf_counter() - self.started
        patches_per_s = self.patches_per_step * self.total_steps / elapsed if elapsed > 0 else 0.0
        return {
            "steps_this_start": self.total_steps,
            "train_seconds": elapsed,
            "patches_per_s": patches_per_s,
            "voxels_per_s": patches_per_s * self.voxels_per_patch,
            "peak_memory_mb": self.last.get("perf/peak_memory_mb", _peak_memory_mb(self.distributed.device)),
        }


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
