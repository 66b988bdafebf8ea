"""``iunet3d bench predict`` end to end on small volumes: both modes per size, identical labels, and the
in-memory accumulator's memory growing with the volume while streaming stays under its limit (speeds are
reported, never asserted)."""

import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
import zarr

from iunet3d.bench.predict import add_arguments, format_table, parse_size, run

SMALL, LARGE = (16, 64, 64), (48, 256, 256)
CLASSES = 8  # 36 bytes per voxel in memory: the large volume's accumulator is 108 MB, the limit 8 MB
TINY = ("--sizes", "16x64x64", "48x256x256", "--patch", "16", "32", "32", "--channels", "4", "--classes",
        str(CLASSES), "--overlap", "0", "--max-memory", "8", "--threads", "1")  # fmt: skip


def _args(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(arguments)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(JSON report, printed table, --dir) of one tiny run."""
    directory = tmp_path_factory.mktemp("bench-predict")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run(_args(*TINY, "--dir", str(directory / "data"), "--json", str(directory / "report.json"))) == 0
    return json.loads((directory / "report.json").read_text()), printed.getvalue(), directory / "data"


@pytest.mark.slow
def test_both_modes_run_once_per_size_in_alternating_order(bench):
    report, _, _ = bench
    assert [(tuple(r["shape"]), r["mode"]) for r in report["runs"]] == [
        (SMALL, "memory"), (SMALL, "streaming"), (LARGE, "streaming"), (LARGE, "memory"),
    ]  # fmt: skip
    assert [tuple(entry["shape"]) for entry in report["sizes"]] == [SMALL, LARGE]
    for entry in report["sizes"]:
        assert entry["voxels"] == math.prod(entry["shape"])
        assert entry["accumulator_bytes"] == 4 * (CLASSES + 1) * entry["voxels"]
        for mode in ("memory", "streaming"):
            result = entry[mode]
            assert result["seconds"] > 0 and result["voxels_per_s"] > 0
            assert result["voxels_per_s"] == pytest.approx(entry["voxels"] / result["seconds"], rel=1e-2)
            assert result["peak_rss_mb"] > 100  # a process that imported torch
            assert 0 < result["cpu_s"] < 3 * result["seconds"] + 1  # CPU seconds of the call, at most 2 threads
        expected = entry["streaming"]["voxels_per_s"] / entry["memory"]["voxels_per_s"]
        assert entry["speed_ratio"] == pytest.approx(expected, rel=1e-2)
    large = report["sizes"][1]
    assert not large["memory"]["streamed"] and large["streaming"]["streamed"]  # 108 MB > the 8 MB limit
    assert report["settings"]["patch"] == [16, 32, 32] and report["settings"]["max_memory"] == 8


@pytest.mark.slow
def test_labels_are_identical_across_modes_and_not_trivial(bench):
    report, _, directory = bench
    for entry in report["sizes"]:
        assert entry["labels_equal"] and entry["differing_fraction"] == 0
        counts = entry["label_counts"]
        assert len(counts) == CLASSES and sum(counts) == entry["voxels"]
        assert sum(count > 0 for count in counts) >= 2  # equal labels mean something
    # the label arrays on disk, read independently of the workers' hashes
    where = directory / "x".join(map(str, LARGE))
    memory, streaming = (np.asarray(zarr.open_array(str(where / f"labels-{mode}.zarr"), mode="r")[...])
                         for mode in ("memory", "streaming"))  # fmt: skip
    assert memory.shape == LARGE and np.array_equal(memory, streaming)
    assert np.bincount(memory.ravel(), minlength=CLASSES).tolist() == report["sizes"][1]["label_counts"]


@pytest.mark.slow
def test_neither_mode_holds_the_whole_accumulator(bench):
    """Without a limit the rows one window covers are held (nothing on disk); with the 8 MB limit, which
    those rows do not fit in, the Zarr accumulator streams; neither peak grows to the accumulator's size."""
    report, _, _ = bench
    large = report["sizes"][1]
    accumulator_mb = large["accumulator_bytes"] / 2**20
    assert accumulator_mb > 100
    assert large["memory"]["accumulator"] == "rows" and large["streaming"]["accumulator"] == "zarr chunks"
    assert large["memory"]["peak_growth_mb"] < accumulator_mb  # 3 rows of 8 of the 48 slices, the network, the trace
    assert large["streaming"]["peak_growth_mb"] < 0.4 * accumulator_mb


@pytest.mark.slow
def test_the_table_has_one_row_per_size(bench):
    report, printed, _ = bench
    rows = [line for line in printed.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 16x64x64", "| 48x256x256"]
    assert rows[1].endswith("| yes |")
    assert "patch 16x32x32" in printed and "max_memory=8 MB" in printed and "torch " in printed
    assert printed.startswith(report["header"])


def test_format_table_reports_differing_labels_and_volumes_that_fit():
    memory = {"seconds": 2.0, "voxels_per_s": 1e6, "peak_growth_mb": 60.0, "peak_rss_mb": 400.0, "streamed": False}
    streaming = {"seconds": 4.0, "voxels_per_s": 5e5, "peak_growth_mb": 12.0, "peak_rss_mb": 350.0, "streamed": False}
    entry = {"shape": [32, 128, 128], "voxels": 524288, "accumulator_bytes": 20 * 524288, "windows": 27,
             "memory": memory, "streaming": streaming, "speed_ratio": 0.5, "labels_equal": False,
             "differing_fraction": 1.5e-5}  # fmt: skip
    row = format_table([entry], "header").splitlines()[-1]
    assert row == (
        "| 32x128x128 | 0.52 | 27 | 10.0 | 2.00 | 1.000 | 60.0 | 4.00 (memory) | 0.500 | 12.0 | 0.50x "
        "| no (1.50e-05 of voxels differ) |"
    )


def test_parse_size():
    assert parse_size("32x128x96") == (32, 128, 96)
    assert parse_size("8X8X8") == (8, 8, 8)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        (("--sizes", "10x10"), "--sizes"),
        (("--sizes", "4x64x64"), "--sizes"),
        (("--sizes", "axbxc"), "--sizes"),
        (("--overlap", "1"), "--overlap"),
        (("--max-memory", "0"), "--max-memory"),
        (("--classes", "1"), "--classes"),
    ],
)
def test_bad_arguments_fail_naming_the_argument(arguments, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        run(_args(*arguments, "--dir", str(tmp_path)))
    assert not any(tmp_path.iterdir())  # refused before anything was written
