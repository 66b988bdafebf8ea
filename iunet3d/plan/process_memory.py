"""The memory of a process tree, read from /proc (Linux): the summed RSS of a process and its descendants.

Used by the probe's parent to sample a training process and its loader workers (``TreeSampler``), and by
``iunet3d bench data``. All sizes are in kB as /proc reports them, unless a name says bytes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    text = stat.read()
            except OSError:  # exited meanwhile
                continue
            parents[int(entry.name)] = int(text.rsplit(b")", 1)[1].split()[1])  # the name may hold ") "
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children = defaultdict(list)
    for pid, parent in _parents().items():
        children[parent].append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB; zeros for a process that exited (or a zombie)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


class TreeSampler:
    """Samples the summed VmRSS of ``root`` and its descendants, every ``interval_s`` seconds in a background
    thread while used as a context manager (or by calling ``sample``).

    ``peak_bytes``: the largest summed RSS seen; ``peak_processes``: the most processes at once;
    ``hwm_bytes``: each process's own high-water mark (VmHWM, exact, unlike the sampled sum, which can miss
    a spike shorter than the interval); ``samples``: how many were taken.
    """

    def __init__(self, root: int, interval_s: float = 0.02):
        self.root, self.interval_s = root, interval_s
        self.peak_bytes = self.peak_processes = self.samples = 0
        self.hwm_bytes: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Summed VmRSS of the tree now, in bytes (0 once the root has exited)."""
        tree = process_tree(self.root)
        total = 0
        for pid in tree:
            rss, hwm = memory_kb(pid)
            total += rss * 1024
            if hwm:
                self.hwm_bytes[pid] = max(self.hwm_bytes.get(pid, 0), hwm * 1024)
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_processes = max(self.peak_processes, len(tree))
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="tree-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def wait_sampling(process, sampler: TreeSampler, timeout_s: float | None = None) -> bool:
    """Sample ``process``'s tree (a ``subprocess.Popen``) until it exits; False if ``timeout_s`` ran out first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            return False
        sampler.sample()
        time.sleep(sampler.interval_s)
    return True
