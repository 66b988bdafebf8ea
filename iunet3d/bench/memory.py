"""``iunet3d bench memory``: the paper's memory table, conventional vs reversible, side by side.

Every (depth, mode) case runs in fresh subprocesses so that no allocator state leaks between cases.
Memory: one process per mode. CPU: peak RSS above the built-model baseline, with glibc's
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS and RSS tracks live tensors;
CUDA: ``torch.cuda.max_memory_allocated`` above the baseline.
Time: that allocator setting makes every large allocation a fresh mmap (page faults on each use),
which slows the recomputing reversible step far more than the conventional one, so step time comes
from one further process per mode with the default allocator, as training runs; the two are asked
for one step in turn, so that load on a shared machine affects both alike.
Depth = coupling layers per branch, spread evenly over the levels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODES = ("conventional", "reversible")


@dataclass
class CaseResult:
    depth: int
    mode: str
    architecture: list[int]
    peak_mb: float
    step_s: float
    reconstruction_error: float | None


def spread_depth(depth: int, levels: int) -> list[int]:
    """Couplings per level summing to ``depth``, as even as possible (extra ones at the top)."""
    if depth < levels:
        raise ValueError(f"--depths: depth {depth} must be >= levels={levels} (every level needs a coupling)")
    return [depth // levels + (1 if i < depth % levels else 0) for i in range(levels)]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS


def _randomise(model) -> None:
    """Weights as after training: default-initialised convolutions, rotated orthogonal kernels."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                module.reset_parameters()
        for name, parameter in model.named_parameters():
            if name.endswith("matrices.weight"):
                parameter.normal_(0, 0.05)


def _build(depth: int, mode: str, channels: int, levels: int, device: str):
    import torch

    from iunet3d import iUNet

    torch.manual_seed(0)  # same weights in every process and mode
    model = iUNet(channels, spread_depth(depth, levels), dim=3, disable_custom_gradient=(mode == "conventional"))
    _randomise(model)
    return model.to(device)


def _training_step(model, x) -> float:
    """One forward + backward; seconds (synchronised on CUDA)."""
    import torch

    cuda = x.device.type == "cuda"
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x).square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_peak_memory(depth: int, mode: str, channels: int, levels: int, size: int, device: str) -> float:
    """Peak memory (MB) of one training step above the built-model baseline, after one warm-up step."""
    import gc

    import torch

    model = _build(depth, mode, channels, levels, device)
    x = torch.randn(1, channels, size, size, size, device=device)
    _training_step(model, x)  # warm-up: allocator, oneDNN primitives
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _training_step(model, x)
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline = _rss_mb("VmRSS")
    _reset_peak_rss()
    _training_step(model, x)
    return _rss_mb("VmHWM") - baseline


def serve_step_times(depth: int, mode: str, channels: int, levels: int, size: int, device: str) -> None:
    """Timing worker: build the model, warm up, then answer commands on stdin, one per line:
    ``step`` -> seconds of one training step; ``error`` -> float32 ``|inverse(forward(x)) - x| / |x|``."""
    import torch

    model = _build(depth, mode, channels, levels, device)
    x = torch.randn(1, channels, size, size, size, device=device)
    _training_step(model, x)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(_training_step(model, x), flush=True)
        elif command == "error":
            with torch.no_grad():
                print(float((model.inverse(model(x)) - x).norm() / x.norm()), flush=True)


def measure_step_times(args: argparse.Namespace, depth: int) -> dict:
    """Median step time per mode. Each mode runs in its own process (its own allocator state, as in
    training); the parent asks them for one step in turn, so load on a shared machine hits both alike."""
    workers = {mode: _start_worker(args, depth, "time", mode, stdin=subprocess.PIPE) for mode in MODES}
    try:
        for mode, worker in workers.items():
            _read_line(worker, depth, mode)  # "ready"
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.steps):
            for mode, worker in workers.items():
                worker.stdin.write("step\n")
                worker.stdin.flush()
                times[mode].append(float(_read_line(worker, depth, mode)))
        workers["reversible"].stdin.write("error\n")
        workers["reversible"].stdin.flush()
        error = float(_read_line(workers["reversible"], depth, "reversible"))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return {"step_s": {mode: statistics.median(times[mode]) for mode in MODES}, "reconstruction_error": error}


def _read_line(worker: subprocess.Popen, depth: int, mode: str) -> str:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker depth={depth} {mode} failed:\n{worker.stderr.read()[-3000:]}")
    return line.strip()


def _start_worker(args: argparse.Namespace, depth: int, measure: str, mode: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable, "-m", "iunet3d.bench.memory", "--worker", "--measure", measure, "--depth", str(depth),
        "--mode", mode, "--channels", str(args.channels), "--levels", str(args.levels), "--size", str(args.size),
        "--device", args.device,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def measure_depth(args: argparse.Namespace, depth: int) -> list[CaseResult]:
    """Both modes at one depth: peak memory in a fresh process per mode (RSS-tracking allocator), then
    step times from one timing process per mode (default allocator), stepped alternately."""
    peaks = {}
    for mode in MODES:
        worker = _start_worker(args, depth, "memory", mode)
        peaks[mode] = float(_read_line(worker, depth, mode))
        worker.wait()
    timing = measure_step_times(args, depth)
    architecture = spread_depth(depth, args.levels)
    return [
        CaseResult(depth, mode, architecture, round(peaks[mode], 2), timing["step_s"][mode],
                   timing["reconstruction_error"] if mode == "reversible" else None)
        for mode in MODES
    ]  # fmt: skip


def cpu_convolution_regime(channels: int, levels: int, size: int) -> str:
    """Which CPU path PyTorch takes for the coupling convolutions per level (batch 1): oneDNN when
    N*C*D*H > 20480, else its slower im2col path (hazards.md); the same for both modes."""
    from iunet3d.models.layout import plan_channels

    plan = plan_channels(channels, [(2, 2, 2)] * (levels - 1), "double")
    parts = []
    for level, level_channels in enumerate(plan.channels):
        edge = size // 2**level
        work = (level_channels // 2) * edge * edge
        parts.append(f"level {level}: {'oneDNN' if work > 20480 else 'im2col'} (N*C*D*H={work})")
    return "CPU 3D convolution path of the coupling functions: " + ", ".join(parts)


def format_table(results: list[CaseResult], header: str) -> str:
    """A Markdown table: one row per depth, conventional and reversible side by side."""
    by_key = {(r.depth, r.mode): r for r in results}
    depths = sorted({r.depth for r in results})
    lines = [
        header,
        "",
        "| depth | architecture | conventional MB | reversible MB | memory ratio | conventional s/step "
        "| reversible s/step | time ratio | fp32 reconstruction error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        conv, rev = by_key[(depth, "conventional")], by_key[(depth, "reversible")]
        lines.append(
            f"| {depth} | {rev.architecture} | {conv.peak_mb:.0f} | {rev.peak_mb:.0f} "
            f"| {100 * rev.peak_mb / conv.peak_mb:.1f}% | {conv.step_s:.2f} | {rev.step_s:.2f} "
            f"| {rev.step_s / conv.step_s:.2f}x | {rev.reconstruction_error:.1e} |"
        )
    if len(depths) > 1:
        first, last = by_key[(depths[0], "reversible")], by_key[(depths[-1], "reversible")]
        growth = (last.peak_mb - first.peak_mb) / (depths[-1] - depths[0])
        lines += ["", f"reversible peak growth: {growth:.2f} MB per added coupling layer per branch "
                      f"(depth {depths[0]} -> {depths[-1]})"]  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench memory``."""
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    for name in ("channels", "levels", "size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for depth in args.depths:
        spread_depth(depth, args.levels)  # fails early, naming --depths
    device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    header = (
        f"iUNet memory benchmark: device={args.device} ({device_name}), float32, input 1x{args.channels}x"
        f"{args.size}^3, {args.levels} levels, stride 2, one forward+backward per step "
        f"(time: median of {args.steps}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        + ("peak = torch.cuda.max_memory_allocated above baseline" if cuda
           else "peak = RSS high-water mark above the built-model baseline, MALLOC_MMAP_THRESHOLD_=65536; "
                "step times from one process per mode with the default allocator, stepped alternately")
    )  # fmt: skip
    if not cuda:
        header += "\n" + cpu_convolution_regime(args.channels, args.levels, args.size)
    results = []
    for depth in args.depths:
        for result in measure_depth(args, depth):
            results.append(result)
            print(f"  measured depth={depth:>3} {result.mode:<12} peak={result.peak_mb:9.1f} MB "
                  f"step={result.step_s:6.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"header": header, "cases": [asdict(r) for r in results]}))
    else:
        print(format_table(results, header))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 30], help="couplings per branch")
    parser.add_argument("--channels", type=int, default=16, help="iUNet in_channels (default 16)")
    parser.add_argument("--levels", type=int, default=3, help="resolution levels (default 3)")
    parser.add_argument("--size", type=int, default=64, help="input edge length: 1 x C x size^3 (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per case (median time)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the table")


def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--measure", choices=("memory", "time"), required=True)
    add_arguments(parser)
    args = parser.parse_args()
    if args.measure == "memory":
        print(measure_peak_memory(args.depth, args.mode, args.channels, args.levels, args.size, args.device))
    else:
        serve_step_times(args.depth, args.mode, args.channels, args.levels, args.size, args.device)


if __name__ == "__main__":
    _worker_main()
