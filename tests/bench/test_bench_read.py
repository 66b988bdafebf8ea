"""``iunet3d bench read`` end to end on a small volume (timings are reported, never asserted)."""

import json
import subprocess
import sys

import pytest

from iunet3d.bench.read import LayoutResult, ReadResult, format_table, read_amplification
from iunet3d.cli import main
from iunet3d.data.storage import StorageOptions, chunk_shape


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "iunet3d", "bench", "read", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_read_amplification_counts_whole_chunks():
    assert read_amplification((0, 0, 0), (32, 64, 64), (32, 64, 64)) == 1.0
    assert read_amplification((1, 0, 0), (32, 64, 64), (32, 64, 64)) == 2.0  # straddles two chunks along z
    assert read_amplification((10, 10, 10), (4, 4, 4), (16, 16, 16)) == 64.0


def test_format_table_puts_variants_side_by_side():
    layouts = [LayoutResult("ours", [32, 64, 64], "blosc(cname=lz4)", 1.0, 10**6, 4.0)]
    reads = [
        ReadResult("ours", [64, 64, 64], 2.0, 3.0, 262.1, 2.5),
        ReadResult("ours-python", [64, 64, 64], 4.0, 6.0, 131.0, 2.5),
        ReadResult("default", [64, 64, 64], 8.0, 15.0, 65.5, 6.0),
    ]
    table = format_table(layouts, reads, "header")
    assert "| ours | (32, 64, 64) | blosc(cname=lz4) | 1.00 | 1.0 | 4.00 |" in table
    assert "| 64x64x64 | ours | ours | zarrs | 2.00 | 3.00 | 4.00x | 5.00x | 262 | 2.50 |" in table
    assert "| 64x64x64 | ours-python | ours | zarr-python | 4.00 | 6.00 | 2.00x | 2.50x | 131 | 2.50 |" in table
    assert "| 64x64x64 | default | default | zarr-python | 8.00 | 15.00 | 1.00x | 1.00x | 66 | 6.00 |" in table


def test_bench_read_reports_both_layouts():
    completed = _bench("--shape", "40", "96", "96", "--sizes", "32", "16", "--reads", "3", "--json")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert {"header", "shape", "spacing", "cpu_count", "zarr_version", "layouts", "reads", "speedups"} <= set(report)
    assert report["shape"] == [40, 96, 96]
    assert "page cache" in report["header"]
    layouts = {layout["layout"]: layout for layout in report["layouts"]}
    assert set(layouts) == {"ours", "default"}
    for layout in layouts.values():
        assert layout["compression_ratio"] > 1
        assert layout["disk_bytes"] > 0 and layout["write_s"] > 0 and layout["codec"]
    assert tuple(layouts["ours"]["chunks"]) == chunk_shape((40, 96, 96), (2.5, 0.8, 0.8), StorageOptions())
    assert "blosc" in layouts["ours"]["codec"]
    reads = {(tuple(r["size"]), r["variant"]): r for r in report["reads"]}
    variants = ("ours", "ours-python", "default", "default-zarrs")  # zarrs is a dependency
    assert set(reads) == {(s, v) for s in ((32, 32, 32), (16, 16, 16)) for v in variants}
    for read in reads.values():
        assert read["read_amplification"] >= 1
        assert read["median_ms"] > 0 and read["mb_per_s"] > 0 and read["cpu_ms"] >= 0
    assert [tuple(s["size"]) for s in report["speedups"]] == [(32, 32, 32), (16, 16, 16)]
    assert all(s["ours_vs_default"] > 0 and s["default_vs_default"] == 1 for s in report["speedups"])


@pytest.mark.parametrize("arguments", [("--sizes", "0"), ("--reads", "0"), ("--shape", "0", "8", "8")])
def test_bench_read_rejects_bad_arguments_in_one_line(capsys, arguments):
    with pytest.raises(SystemExit) as exited:  # in this process: the same main() the console script runs
        main(["bench", "read", *arguments])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert arguments[0] in message
