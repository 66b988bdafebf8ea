"""The C allocator keeps freed memory inside ``freed_memory_kept`` and hands it back on exit (glibc).

Each check runs in a fresh interpreter, whose allocator has not been tuned by anything else: a loop frees
and reallocates buffers of several MB, as a prediction's batches do, and counts the minor page faults of
its later rounds (pages the allocator had handed back and had to map again)."""

import json
import subprocess
import sys

SCRIPT = """
import json, resource, sys
import numpy as np
from iunet3d.host_memory import freed_memory_kept

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

def rounds(count):
    for _ in range(count):
        buffers = [np.full(size // 8, 1.0) for size in (8 << 20, 8 << 20, 4 << 20)]
        del buffers

rounds(3)  # glibc's dynamic thresholds settle
if sys.argv[1] == "kept":
    with freed_memory_kept():
        rounds(1)
        before = faults()
        rounds(5)
        later = faults() - before
        inside = rss_mb()
    after = rss_mb()
else:
    before = faults()
    rounds(5)
    later, inside, after = faults() - before, rss_mb(), rss_mb()
print(json.dumps({"faults": later, "rss_inside_mb": inside, "rss_after_mb": after}))
"""


def _run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_freed_buffers_are_reused_inside_and_handed_back_after():
    default, kept = _run("default"), _run("kept")
    assert default["faults"] > 1000  # glibc handed freed buffers back and faulted them in again
    assert kept["faults"] < default["faults"] / 10
    assert kept["rss_inside_mb"] - kept["rss_after_mb"] > 15  # the kept 20 MB went back on exit
