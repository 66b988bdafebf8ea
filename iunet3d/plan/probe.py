"""Measure the peak memory and step time of training one configuration, in a fresh process.

``measure_training(config, device)`` starts ``python -m iunet3d.plan.probe``, which reads a JSON spec (stdin,
or the first argument), runs ``steps`` training steps exactly as ``Trainer`` does (the same network, Dice +
CE loss, AdamW, gradient scaler, autocast per ``train.precision`` on CUDA and float32 on CPU, channels-last
as configured, gradient clipping) on batches from a real ``PatchStream`` + ``PatchLoader`` over
``data.dataset`` with ``data.num_workers`` workers (or random tensors of the batch's shape with
``use_dataset=False``), and prints one JSON line. A fresh process per probe: no allocator state leaks from
one probe into the next.

Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` over the steps (``reserved_bytes``: the caching allocator's
    ``max_memory_reserved``, what ``nvidia-smi`` sees minus the CUDA context); baseline: allocated after
    building the network, optimizer and loader, before the first step.
  * CPU: the peak of the summed RSS of the probe process and its descendants (the loader workers), sampled
    from /proc every ~20 ms by the parent, with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
    tensors go back to the OS and RSS tracks live tensors (as ``iunet3d bench memory`` measures); baseline:
    the probe's RSS after imports and building, before the first step (the workers start with it).
    ``hwm_bytes`` is the sum of each process's own high-water mark (an upper bound; the sampled sum can
    miss a spike shorter than the interval).

Step time: the median over the steps after the first (which also allocates the optimizer state), from the
request of the batch to the end of the optimizer step (CUDA synchronised). On CPU it runs under the
RSS-tracking allocator above, which makes large allocations fresh mmaps (page faults on each use), so it
is slower than under the default allocator that training uses.

Spec (JSON): ``{"config": to_dict(TrainingConfig), "device": "cpu"|"cuda[:N]", "steps": 3,
"use_dataset": true, "num_classes": null, "optimizer": "adamw"|"sgd", "builder": null |
{"builder": "package.module:function", "kwargs": {...}}}``. ``builder`` names a function of this repository
(``iunet3d.*`` or ``tests.*``) returning an ``nn.Module`` (B, 1, D, H, W) -> (B, K, D, H, W) that replaces
``SegmentationIUNet``; it is called with ``num_classes=K`` and ``kwargs``.
Result line: ``{"ok": true, "baseline_bytes", "peak_bytes" (CUDA only; the parent adds CPU's),
"reserved_bytes", "step_seconds", "step_times", "num_parameters", "num_classes", "batches"}`` or
``{"ok": false, "error": "one line"}``.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from iunet3d.plan.process_memory import TreeSampler, wait_sampling

OPTIMIZERS = ("adamw", "sgd")
#: Packages a ``builder`` may come from: this repository's code only.
BUILDER_PACKAGES = ("iunet3d", "tests")
#: glibc: allocations above 64 kB are mmaps, returned to the OS when freed, so RSS tracks live tensors.
TRACKING_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
DEFAULT_TIMEOUT_S = 900.0


class ProbeError(RuntimeError):
    """A probe failed (out of memory, a bad config, a crash); the message is one line naming the config."""


@dataclass
class Measurement:
    """One probe: memory in bytes, times in seconds."""

    peak_bytes: int  #: CUDA: max_memory_allocated; CPU: peak summed RSS of the process tree
    baseline_bytes: int  #: after imports and building, before the first step (CUDA: allocated)
    step_seconds: float  #: median over the steps after the first
    device: str
    reserved_bytes: int | None = None  #: CUDA: max_memory_reserved
    host_peak_bytes: int = 0  #: peak summed RSS of the process tree (on CUDA too)
    hwm_bytes: int = 0  #: sum of each process's own RSS high-water mark (>= the true simultaneous peak)
    processes: int = 1  #: most processes of the tree at once (1 + loader workers)
    num_parameters: int = 0
    num_classes: int = 0
    batches: str = "dataset"  #: "dataset" (PatchStream + PatchLoader) or "random" (random tensors)
    step_times: list[float] = field(default_factory=list)  #: every step, the first included
    wall_seconds: float = 0.0  #: the whole probe process, start to exit

    @property
    def activation_bytes(self) -> int:
        """Peak above the baseline: what the steps added (optimizer state, activations, batches, workers)."""
        return self.peak_bytes - self.baseline_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def describe(config, device: str = "cpu") -> str:
    """One line naming a config's memory-relevant choices, for errors and tables."""
    data, model = config.data, config.model
    patch = "x".join(map(str, data.patch_size))
    precision = config.train.precision if device.startswith("cuda") else "fp32"
    return (f"patch {patch} batch {data.batch_size} channels {model.channels} architecture "
            f"{list(model.architecture)} block_depth {model.block_depth} engine {model.reversible_engine} "
            f"workers {data.num_workers} {precision} on {device}")  # fmt: skip


def measure_training(
    config,
    device: str = "cpu",
    steps: int = 3,
    builder: dict | None = None,
    optimizer: str = "adamw",
    use_dataset: bool = True,
    num_classes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = 0.02,
) -> Measurement:
    """Train ``config`` (a ``TrainingConfig``) for ``steps`` steps on ``device`` in a fresh process and measure
    it (see the module docstring). ``num_classes``: for ``use_dataset=False`` when ``data.classes`` is unset
    (default 2). Raises ``ProbeError`` (one line naming the config) when the probe fails or times out."""
    from iunet3d.train.toml_config import to_dict

    name = describe(config, device)
    if steps < 1:
        raise ProbeError(f"probe {name}: steps must be >= 1, got {steps}")
    if optimizer not in OPTIMIZERS:
        raise ProbeError(f"probe {name}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    spec = {"config": to_dict(config), "device": device, "steps": steps, "use_dataset": use_dataset,
            "num_classes": num_classes, "optimizer": optimizer, "builder": builder}  # fmt: skip
    cuda = device.startswith("cuda")
    env = dict(os.environ, PYTHONWARNINGS="ignore", **({} if cuda else TRACKING_ALLOCATOR))
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "iunet3d.plan.probe"], stdin=subprocess.PIPE, stdout=out,
                                   stderr=err, text=True, env=env)  # fmt: skip
        sampler = TreeSampler(process.pid, interval_s)
        try:
            process.stdin.write(json.dumps(spec))
            process.stdin.close()
        except BrokenPipeError:
            pass
        if not wait_sampling(process, sampler, timeout_s):
            process.kill()
            process.wait()
            raise ProbeError(f"probe {name}: timed out after {timeout_s:g} s")
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else None
        stderr = err.read()
    if result is None or not result.get("ok"):
        raise ProbeError(f"probe {name}: {_reason(result, process.returncode, stderr)}")
    host_peak = sampler.peak_bytes
    return Measurement(
        peak_bytes=int(result["peak_bytes"]) if cuda else max(host_peak, int(result["baseline_bytes"])),
        baseline_bytes=int(result["baseline_bytes"]),
        step_seconds=float(result["step_seconds"]),
        device=device,
        reserved_bytes=result.get("reserved_bytes"),
        host_peak_bytes=host_peak,
        hwm_bytes=sum(sampler.hwm_bytes.values()),
        processes=sampler.peak_processes,
        num_parameters=int(result["num_parameters"]),
        num_classes=int(result["num_classes"]),
        batches=result["batches"],
        step_times=[float(t) for t in result["step_times"]],
        wall_seconds=time.perf_counter() - start,
    )


def _reason(result: dict | None, returncode: int, stderr: str) -> str:
    if result is not None:
        return result.get("error", "failed")
    if returncode is not None and returncode < 0:
        signal = -returncode
        return f"killed by signal {signal}" + (" (out of memory?)" if signal == 9 else "")
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return f"exited with code {returncode}" + (f": {lines[-1]}" if lines else " without a result")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}"[:500]


# ----- the probe process -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_builder(name: str):
    """The function ``package.module:function`` of this repository (``BUILDER_PACKAGES``)."""
    module_name, _, function_name = name.partition(":")
    if not function_name or module_name.split(".")[0] not in BUILDER_PACKAGES:
        raise ValueError(f"builder: expected 'package.module:function' inside {BUILDER_PACKAGES}, got {name!r}")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if not callable(function):
        raise ValueError(f"builder: {name!r} is not a function")
    return function


def _random_batches(batch_size: int, patch_size, num_classes: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        image = torch.randn(batch_size, 1, *patch_size, generator=generator)
        label = torch.randint(0, num_classes, (batch_size, *patch_size), generator=generator)
        yield {"image": image, "label": label}


def _dataset_loader(config, device, pin_memory: bool):
    """(loader, num_classes) as ``Trainer`` builds them (training cases of rank 0 of 1)."""
    from iunet3d.data import CTNormalization, open_dataset
    from iunet3d.data.resampling import dataset_target_spacing
    from iunet3d.patches import PatchLoader, PatchStream, split_cases

    data = config.data
    dataset = open_dataset(data.dataset)
    train_cases, _ = split_cases(dataset.case_names, data.validation_cases, data.split_seed)
    normalization = CTNormalization.window(*data.window) if data.window else CTNormalization.from_dataset(dataset)
    target = dataset_target_spacing(dataset, data.target_spacing)
    stream = PatchStream(
        dataset, patch_size=data.patch_size, rank=0, world_size=1, seed=config.train.seed,
        transform=config.augmentation if data.augment else None, foreground_fraction=data.foreground_fraction,
        class_probabilities=data.class_probabilities(dataset.num_classes), cases=train_cases,
        normalization=normalization, target_spacing="native" if target is None else target,
        image_interpolation=data.image_interpolation, label_interpolation=data.label_interpolation,
    )  # fmt: skip
    return PatchLoader(stream, data.batch_size, data.num_workers, pin_memory=pin_memory), dataset.num_classes


def run_probe(spec: dict) -> dict:
    """Build and train per ``spec`` (see the module docstring) in this process; the result dict."""
    import contextlib
    import gc

    import torch

    from iunet3d.models.precision import autocast_dtype_for
    from iunet3d.models.segmentation import SegmentationIUNet
    from iunet3d.train.config import TrainingConfig
    from iunet3d.train.loss import DiceCELoss
    from iunet3d.train.toml_config import from_dict

    raw = dict(spec["config"])
    use_dataset = bool(spec.get("use_dataset", True))
    if not use_dataset and not raw.get("data", {}).get("dataset"):
        raw["data"] = {**raw.get("data", {}), "dataset": "<random>"}  # the config requires one; unused
    config = from_dict(TrainingConfig, raw, "probe spec")
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False")
        if device.index is not None:
            torch.cuda.set_device(device)
    data, train = config.data, config.train
    torch.manual_seed(train.seed)
    if use_dataset:
        loader, num_classes = _dataset_loader(config, device, pin_memory=cuda)
    else:
        num_classes = len(data.classes) if data.classes else int(spec.get("num_classes") or 2)
        loader = _random_batches(data.batch_size, data.patch_size, num_classes, train.seed)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    builder = spec.get("builder")
    if builder:
        network = load_builder(builder["builder"])(num_classes=num_classes, **builder.get("kwargs", {}))
    else:
        network = SegmentationIUNet(1, num_classes, **config.model.network_kwargs())
    network.to(device, memory_format=memory_format)
    for parameter in network.parameters():  # as the trainer: 1x1x1 kernels keep standard strides
        if parameter.dim() == 5 and parameter.shape[2:] == (1, 1, 1):
            parameter.data = torch.empty_like(parameter, memory_format=torch.contiguous_format).copy_(parameter)
    loss_function = DiceCELoss(config.loss.dice_weight, config.loss.ce_weight)
    if spec.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(network.parameters(), lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    autocast_dtype = autocast_dtype_for(train.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and train.precision == "fp16")

    def autocast():
        return contextlib.nullcontext() if autocast_dtype is None else torch.autocast("cuda", dtype=autocast_dtype)

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_bytes()
    network.train()
    times = []
    try:
        for _ in range(int(spec.get("steps", 3))):
            start = time.perf_counter()
            batch = next(loader)
            image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            with autocast():
                loss = loss_function(network(image), label)
            scaler.scale(loss).backward()
            if not torch.isfinite(loss.detach()):
                raise ValueError(f"the loss is not finite ({float(loss)})")
            if train.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), train.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            del image, label, loss, batch
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        if hasattr(loader, "close"):
            loader.close()
    result = {
        "ok": True,
        "baseline_bytes": baseline,
        "step_times": times,
        "step_seconds": statistics.median(times[1:] or times),
        "num_parameters": sum(p.numel() for p in network.parameters()),
        "num_classes": num_classes,
        "batches": "dataset" if use_dataset else "random",
    }
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(argv[0] if argv and argv[0] != "-" else sys.stdin.read())
        result = run_probe(spec)
    except Exception as error:  # one line back to the parent, never a traceback
        print(json.dumps({"ok": False, "error": _one_line(error)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
