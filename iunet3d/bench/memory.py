"""``iunet3d bench memory``: the paper's memory table, plain autograd vs both reversible engines, side by side.

Modes: ``conventional`` (plain autograd, ``disable_custom_gradient=True``), ``memcnn`` (memcnn's wrapper)
and ``fused`` (our engine, the default). Every (depth, mode) case runs in fresh subprocesses so that no
allocator state leaks between cases.
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
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODES = ("conventional", "memcnn", "fused")
PRECISIONS = ("fp32", "bf16")


@dataclass
class CaseResult:
    depth: int
    mode: str
    architecture: list[int]
    peak_mb: float | None  #: None: the mode failed (see ``error``)
    step_s: float | None
    reconstruction_error: float | None
    error: str | None = None
    cpu_s: float | None = None  #: CPU seconds of the step's process (all threads); None on CUDA


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
    engine = {"conventional": {"disable_custom_gradient": True}, "memcnn": {"reversible_engine": "memcnn"}}
    model = iUNet(channels, spread_depth(depth, levels), dim=3, **engine.get(mode, {}))
    _randomise(model)
    return model.to(device)


def _autocast(device: str, precision: str):
    import torch

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _training_step(model, x, precision: str) -> float:
    """One forward + backward (forward under ``precision``'s autocast); seconds (synchronised on CUDA)."""
    import torch

    cuda = x.device.type == "cuda"
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with _autocast(str(x.device), precision):
        loss = model(x).float().square().mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_peak_memory(args: argparse.Namespace, depth: int, mode: str) -> float:
    """Peak memory (MB) of one training step above the built-model baseline, after one warm-up step."""
    import gc

    import torch

    model = _build(depth, mode, args.channels, args.levels, args.device)
    x = torch.randn(1, args.channels, args.size, args.size, args.size, device=args.device)
    _training_step(model, x, args.precision)  # warm-up: allocator, oneDNN primitives
    model.zero_grad(set_to_none=True)
    gc.collect()
    if args.device.startswith("cuda"):
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _training_step(model, x, args.precision)
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    baseline = _rss_mb("VmRSS")
    _reset_peak_rss()
    _training_step(model, x, args.precision)
    return _rss_mb("VmHWM") - baseline


def serve_step_times(args: argparse.Namespace, depth: int, mode: str) -> None:
    """Timing worker: build the model, warm up, then answer commands on stdin, one per line:
    ``step`` -> seconds of one training step; ``error`` -> ``reconstruction_error`` under the precision."""
    import torch

    model = _build(depth, mode, args.channels, args.levels, args.device)
    x = torch.randn(1, args.channels, args.size, args.size, args.size, device=args.device)
    _training_step(model, x, args.precision)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            cpu_start = time.process_time()
            wall = _training_step(model, x, args.precision)
            print(wall, time.process_time() - cpu_start, flush=True)
        elif command == "error":
            with _autocast(args.device, args.precision):
                print(model.reconstruction_error(x).total, flush=True)


class WorkerFailedError(RuntimeError):
    """A benchmark worker exited without an answer; ``reason`` is the last line of its error output."""

    def __init__(self, depth: int, mode: str, stderr: str):
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        self.reason = lines[-1].strip() if lines else "exited without output"
        super().__init__(f"benchmark worker depth={depth} {mode} failed:\n{stderr[-3000:]}")


def measure_step_times(args: argparse.Namespace, depth: int, modes: list[str]) -> dict:
    """Median step time per mode. Each mode runs in its own process (its own allocator state, as in
    training); the parent asks them for one step in turn, so load on a shared machine hits all alike.
    Returns ``{"step_s": {mode: s}, "cpu_s": {mode: s}, "reconstruction_error": e or None,
    "failed": {mode: reason}}``."""
    workers = {mode: _start_worker(args, depth, "time", mode, stdin=subprocess.PIPE) for mode in modes}
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}

    def ask(mode: str, command: str | None) -> str | None:
        if mode in failed:
            return None
        worker = workers[mode]
        try:
            if command is not None:
                worker.stdin.write(command + "\n")
                worker.stdin.flush()
            return _read_line(worker, depth, mode)
        except (WorkerFailedError, BrokenPipeError) as error:
            failed[mode] = error.reason if isinstance(error, WorkerFailedError) else "worker exited"
            return None

    try:
        for mode in modes:
            ask(mode, None)  # "ready"
        for _ in range(args.steps):
            for mode in modes:
                answer = ask(mode, "step")
                if answer is not None:
                    wall, cpu = answer.split()
                    times[mode].append(float(wall))
                    cpu_times[mode].append(float(cpu))
        error = ask("fused", "error") if "fused" in modes else None
    finally:
        for worker in workers.values():
            with contextlib.suppress(BrokenPipeError):
                worker.stdin.close()
            worker.wait()
    return {
        "step_s": {mode: statistics.median(times[mode]) for mode in modes if times[mode] and mode not in failed},
        "cpu_s": {mode: statistics.median(cpu_times[mode]) for mode in modes if times[mode] and mode not in failed},
        "reconstruction_error": None if error is None else float(error),
        "failed": failed,
    }


def _read_line(worker: subprocess.Popen, depth: int, mode: str) -> str:
    line = worker.stdout.readline()
    if not line:
        worker.wait()
        raise WorkerFailedError(depth, mode, worker.stderr.read())
    return line.strip()


def _start_worker(args: argparse.Namespace, depth: int, measure: str, mode: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable, "-m", "iunet3d.bench.memory", "--worker", "--measure", measure, "--depth", str(depth),
        "--mode", mode, "--channels", str(args.channels), "--levels", str(args.levels), "--size", str(args.size),
        "--device", args.device, "--precision", args.precision,
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def measure_depth(args: argparse.Namespace, depth: int) -> list[CaseResult]:
    """Every mode at one depth: peak memory in a fresh process per mode (RSS-tracking allocator), then
    step times from one timing process per mode (default allocator), stepped in turn."""
    peaks, failed = {}, {}
    for mode in args.modes:
        worker = _start_worker(args, depth, "memory", mode)
        try:
            peaks[mode] = float(_read_line(worker, depth, mode))
        except WorkerFailedError as error:
            failed[mode] = error.reason
        worker.wait()
    timing = measure_step_times(args, depth, [mode for mode in args.modes if mode not in failed])
    failed.update(timing["failed"])
    architecture = spread_depth(depth, args.levels)
    return [
        CaseResult(depth, mode, architecture, None if mode in failed else round(peaks[mode], 2),
                   timing["step_s"].get(mode), timing["reconstruction_error"] if mode == "fused" else None,
                   failed.get(mode), None if args.device.startswith("cuda") else timing["cpu_s"].get(mode))
        for mode in args.modes
    ]  # fmt: skip


def cpu_convolution_regime(channels: int, levels: int, size: int) -> str:
    """Which CPU path PyTorch takes for the coupling convolutions per level (batch 1): oneDNN when
    N*C*D*H > 20480, else its slower im2col path; the same for every mode."""
    from iunet3d.models.layout import plan_channels

    plan = plan_channels(channels, [(2, 2, 2)] * (levels - 1), "double")
    parts = []
    for level, level_channels in enumerate(plan.channels):
        edge = size // 2**level
        work = (level_channels // 2) * edge * edge
        parts.append(f"level {level}: {'oneDNN' if work > 20480 else 'im2col'} (N*C*D*H={work})")
    return "CPU 3D convolution path of the coupling functions: " + ", ".join(parts)


def _ratio(numerator: float | None, denominator: float | None, unit: str) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{100 * numerator / denominator:.1f}%" if unit == "%" else f"{numerator / denominator:.2f}x"


def _value(value: float | None, spec: str) -> str:
    return "failed" if value is None else format(value, spec)


def format_table(results: list[CaseResult], header: str) -> str:
    """A Markdown table: one row per depth, the modes side by side, ratios to conventional and memcnn (of peak
    memory, step wall time and, on CPU, the CPU seconds of the step)."""
    by_key = {(r.depth, r.mode): r for r in results}
    depths = sorted({r.depth for r in results})
    modes = [mode for mode in MODES if any(r.mode == mode for r in results)]
    measures = [("memory", "peak_mb", "%"), ("time", "step_s", "x")]
    if any(r.cpu_s is not None for r in results):  # CPU seconds: less sensitive to other load on the machine
        measures.append(("CPU time", "cpu_s", "x"))
    columns = (["depth", "architecture"] + [f"{mode} MB" for mode in modes] + [f"{mode} s/step" for mode in modes]
               + [f"{a}/{b} {what}" for what, _, _ in measures for a, b in _COMPARISONS if a in modes and b in modes]
               + ["fused reconstruction error"] * ("fused" in modes))  # fmt: skip
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for depth in depths:
        rows = {mode: by_key[(depth, mode)] for mode in modes}
        cells = [str(depth), str(next(iter(rows.values())).architecture)]
        cells += [_value(rows[mode].peak_mb, ".0f") for mode in modes]
        cells += [_value(rows[mode].step_s, ".2f") for mode in modes]
        for _, what, unit in measures:
            cells += [_ratio(getattr(rows[a], what), getattr(rows[b], what), unit)
                      for a, b in _COMPARISONS if a in modes and b in modes]  # fmt: skip
        if "fused" in modes:
            error = rows["fused"].reconstruction_error
            cells.append("n/a" if error is None else f"{error:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(depths) > 1:
        lines.append("")
        for mode in modes:
            first, last = by_key[(depths[0], mode)], by_key[(depths[-1], mode)]
            if first.peak_mb is not None and last.peak_mb is not None:
                growth = (last.peak_mb - first.peak_mb) / (depths[-1] - depths[0])
                lines.append(f"{mode} peak growth: {growth:.2f} MB per added coupling layer per branch "
                             f"(depth {depths[0]} -> {depths[-1]})")  # fmt: skip
    for result in results:
        if result.error:
            lines.append(f"{result.mode} failed at depth {result.depth}: {result.error}")
    return "\n".join(lines)


_COMPARISONS = (("memcnn", "conventional"), ("fused", "conventional"), ("fused", "memcnn"))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench memory``."""
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    for name in ("channels", "levels", "size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.modes = list(dict.fromkeys(args.modes))
    for depth in args.depths:
        spread_depth(depth, args.levels)  # fails early, naming --depths
    device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    header = (
        f"iUNet memory benchmark: device={args.device} ({device_name}), {args.precision} "
        f"({'bf16 autocast' if args.precision == 'bf16' else 'float32'}), input 1x{args.channels}x"
        f"{args.size}^3, {args.levels} levels, stride 2, one forward+backward per step "
        f"(time: median of {args.steps}; on CPU also the process CPU seconds of the step), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        + ("peak = torch.cuda.max_memory_allocated above baseline" if cuda
           else "peak = RSS high-water mark above the built-model baseline, MALLOC_MMAP_THRESHOLD_=65536; "
                "step times from one process per mode with the default allocator, stepped in turn")
    )  # fmt: skip
    if not cuda:
        header += "\n" + cpu_convolution_regime(args.channels, args.levels, args.size)
    results = []
    for depth in args.depths:
        for result in measure_depth(args, depth):
            results.append(result)
            print(f"  measured depth={depth:>3} {result.mode:<12} peak={_value(result.peak_mb, '9.1f')} MB "
                  f"step={_value(result.step_s, '6.2f')} s", file=sys.stderr, flush=True)  # fmt: skip
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
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16 autocast around the forward pass (default fp32)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="which of conventional, memcnn and fused to measure (default: all)")  # fmt: skip
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
        print(measure_peak_memory(args, args.depth, args.mode))
    else:
        serve_step_times(args, args.depth, args.mode)


if __name__ == "__main__":
    _worker_main()
