"""``iunet3d bench data`` end to end on tiny volumes (rates are reported, never asserted), and its memory probe."""

import argparse
import json
import math
import pickle
import subprocess
import sys

import pytest

from iunet3d.bench.data import (
    SideResult,
    TreeMemory,
    _check_manifest,
    add_arguments,
    case_jobs,
    case_shape,
    case_spacing,
    format_table,
    memory_kb,
    process_tree,
    resolve_target,
    run_side,
    side_command,
)
from iunet3d.cli import main

# two cases of the default --slice-thickness cycle: z spacing 1.0 (100 slices) and 2.5 mm (40 slices)
TINY = ("--cases", "2", "--shape", "40", "96", "96", "--patch", "16", "32", "32", "--patches", "8", "--workers", "1")


def _arguments(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(arguments))


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "iunet3d", "bench", "data", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_bench_data_runs_every_side_and_reuses_its_data(tmp_path):
    import nibabel as nib
    import numpy as np

    data = tmp_path / "data"
    completed = _bench(*TINY, "--batch-size", "3", "--dir", str(data), "--json")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for key in ("patches_per_s_ours", "patches_per_s_torchio", "patches_per_s_resampled", "rss_mb_ours",
                "rss_mb_torchio", "rss_mb_resampled", "speedup", "rss_ratio", "seconds_ours", "seconds_torchio",
                "seconds_resampled", "resampled_time_ratio"):  # fmt: skip
        assert math.isfinite(report[key]) and report[key] > 0, key
    # 8 patches in batches of 3: 3 + 3 + 2 on every side, every batch shape-checked by the side itself
    assert report["patches_ours"] == report["patches_torchio"] == report["patches_resampled"] == 8
    assert report["resampled_time_ratio"] == pytest.approx(
        report["patches_per_s_ours"] / report["patches_per_s_resampled"], 1e-2
    )
    assert report["speedup"] == pytest.approx(report["patches_per_s_ours"] / report["patches_per_s_torchio"], 1e-2)
    assert report["rss_ratio"] == pytest.approx(report["rss_mb_ours"] / report["rss_mb_torchio"], 1e-2)
    assert report["pss_ratio"] == pytest.approx(report["pss_mb_ours"] / report["pss_mb_torchio"], 1e-2)
    settings = report["settings"]
    assert settings["patch"] == [16, 32, 32] and settings["workers"] == 1 and settings["batch_size"] == 3
    assert settings["queue_max_length"] == 16 and settings["samples_per_volume"] == 8
    assert settings["sides"] == ["torchio", "ours", "resampled"]
    assert settings["case_shapes"] == [[100, 96, 96], [40, 96, 96]]
    assert settings["target_spacing"] == pytest.approx([1.75, 0.8, 0.8])  # median of 1.0 and 2.5: not anisotropic
    for side in ("ours", "torchio", "resampled"):
        result = report["sides"][side]
        assert result["peak_processes"] >= 2  # the side's process and its worker were both sampled
        assert result["peak_rss_mb"] > 100  # a process that imported torch
        assert result["peak_rss_mb"] <= result["hwm_sum_mb"] * 1.01  # sampled peak <= sum of per-process peaks
        assert 50 < result["peak_pss_mb"] < result["peak_rss_mb"]  # shared library pages count once in PSS
        assert 0 < result["first_batch_s"] <= result["seconds"]
    assert report["data"]["zarr_cases_written"] == 2 and report["data"]["nifti_cases_written"] == 2
    assert sorted(p.name for p in (data / "nifti").iterdir()) == [
        "case_0_image.nii.gz", "case_0_label.nii.gz", "case_1_image.nii.gz", "case_1_label.nii.gz",
    ]  # fmt: skip
    for index, spacing in enumerate((1.0, 2.5)):  # each case's own spacing in TorchIO's affine
        image = nib.load(data / "nifti" / f"case_{index}_image.nii.gz")
        np.testing.assert_allclose(image.affine, np.diag([spacing, 0.8, 0.8, 1.0]), atol=1e-6)
        assert image.shape == ((100, 40)[index], 96, 96)
    table = _bench(*TINY, "--sides", "torchio,ours", "--dir", str(data))  # reuses the data, prints the table
    assert table.returncode == 0, table.stderr
    assert "| torchio | 8 |" in table.stdout and "| ours | 8 |" in table.stdout
    assert "| resampled |" not in table.stdout and "resampled / native" not in table.stdout
    assert "ours vs TorchIO:" in table.stdout and "96x96 voxels" in table.stdout and "(100, 40 slices)" in table.stdout
    assert "writing" not in table.stderr  # complete data is reused, nothing is written again


@pytest.mark.slow
def test_bench_data_compares_resampled_with_native_patches_only(tmp_path):
    data = tmp_path / "data"
    completed = _bench(*TINY, "--sides", "ours,resampled", "--augmentation", "no-spatial", "--slice-thickness", "1.0",
                       "2.5", "5.0", "--cases", "3", "--label-interpolation", "linear", "--dir", str(data))  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    table = completed.stdout
    assert "| ours | 8 |" in table and "| resampled | 8 |" in table and "| torchio |" not in table
    assert "resampled / native per-patch time: " in table and "s per patch" in table and "target <= 1.5x: " in table
    assert "ours vs TorchIO" not in table
    # three cases at 1.0, 2.5 and 5.0 mm: anisotropic median (2.5 > 3 * 0.8), so z takes its 10th percentile
    assert "target spacing 1.3x0.8x0.8 mm (--target-spacing auto)" in table and "label linear" in table
    assert "--augmentation no-spatial: flip axes" in table and "affine" not in table.split("resampled:")[0]
    assert not (data / "nifti").exists()  # no TorchIO side: no .nii.gz copies


def test_nifti_files_hold_the_stored_case_in_the_same_axis_order(tmp_path):
    import nibabel as nib
    import numpy as np

    from iunet3d.bench.data import _write_nifti
    from iunet3d.data.convert import CaseJob, run_conversion
    from iunet3d.data.dataset import open_dataset

    job = CaseJob(case="case_0", synthetic={"shape": [12, 20, 24], "spacing": [2.5, 0.8, 0.7], "seed": [0, 0]})
    report = run_conversion([job], tmp_path / "zarr", progress=False)
    assert report.converted == ["case_0"]
    case = open_dataset(tmp_path / "zarr").case("case_0")
    _write_nifti(str(case.path), str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    image, label = nib.load(tmp_path / "image.nii.gz"), nib.load(tmp_path / "label.nii.gz")
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), case.image_array[...])
    np.testing.assert_array_equal(np.asarray(label.dataobj), case.label_array()[...])
    np.testing.assert_allclose(image.affine, np.diag([2.5, 0.8, 0.7, 1.0]), atol=1e-6)
    assert not list(tmp_path.glob("*.partial.nii.gz"))


def test_normalisation_of_the_torchio_side_matches_ours_and_pickles():
    import numpy as np
    import torch
    import torchio as tio

    from iunet3d.data.normalization import CTNormalization
    from iunet3d.patches.transforms import normalization_transform

    normalization = CTNormalization.window(-1000, 1000)
    hu = torch.tensor([-3000, -1000, 0, 500, 1000, 2000], dtype=torch.int16).reshape(1, 1, 2, 3)
    subject = tio.Subject(image=tio.ScalarImage(tensor=hu), label=tio.LabelMap(tensor=torch.ones_like(hu)))
    out = pickle.loads(pickle.dumps(normalization_transform(normalization)(subject)))  # crosses worker processes
    np.testing.assert_allclose(out["image"].data.numpy(), normalization(hu.numpy()))
    assert out["image"].data.flatten().tolist() == [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]
    assert out["label"].data.equal(torch.ones_like(hu))  # labels are left alone


def test_tree_memory_sums_the_descendants():
    child = (
        "import subprocess, sys\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', "
        "'import time; b = b\"x\" * (200 * 2**20); print(flush=True); time.sleep(30)'], stdout=subprocess.PIPE)\n"
        "grandchild.stdout.readline()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "grandchild.kill()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        tree = process_tree(process.pid)
        assert len(tree) == 2 and tree[0] == process.pid
        memory = TreeMemory(process.pid)
        total_mb = memory.sample() / 1024
        own_mb = memory_kb(process.pid)[0] / 1024
        assert total_mb > own_mb + 190  # the grandchild's 200 MB buffer counts
        assert memory.peak_processes == 2 and memory.peak_kb / 1024 == pytest.approx(total_mb)
    finally:
        process.stdin.write("\n")
        process.stdin.close()
        process.wait(timeout=30)
    assert memory_kb(process.pid) == (0, 0)  # exited: nothing to count


def test_format_table_adds_the_resampled_row_and_its_time_ratio():
    results = {
        "ours": SideResult("ours", 64, 4.0, 16.0, 1.0, 20.0, 800.0, 350.0, 4, 900.0),
        "resampled": SideResult("resampled", 64, 5.0, 12.8, 1.2, 16.0, 820.0, 360.0, 4, 920.0),
    }
    table = format_table(results, "header", "no-spatial")
    assert "| ours | 64 | 4.00 | 16.00 | 20.00 | 1.00 | 800 | 350 | 4 |" in table
    assert "| resampled | 64 | 5.00 | 12.80 | 16.00 | 1.20 | 820 | 360 | 4 |" in table
    assert "| torchio |" not in table and "ours vs TorchIO" not in table
    assert (
        "resampled / native per-patch time: 1.25x (0.0781 vs 0.0625 s per patch), steady 1.25x "
        "(0.0625 vs 0.0500 s per patch); target <= 1.5x: met" in table
    )
    slow = {**results, "resampled": SideResult("resampled", 64, 8.0, 8.0, 1.2, 16.0, 820.0, 360.0, 4, 920.0)}
    assert "time: 2.00x" in format_table(slow, "header", "no-spatial") and "1.5x: not met" in format_table(
        slow, "header", "no-spatial"
    )
    assert "the 1.5x target applies to --augmentation no-spatial" in format_table(results, "header", "default")


def test_cases_cycle_through_the_slice_thicknesses_keeping_the_field_of_view():
    args = _arguments()  # the defaults: 300 slices at 2.5 mm (750 mm), --slice-thickness 1.0 2.5 5.0
    assert [case_spacing(args, i) for i in range(4)] == [[1.0, 0.8, 0.8], [2.5, 0.8, 0.8], [5.0, 0.8, 0.8],
                                                         [1.0, 0.8, 0.8]]  # fmt: skip
    assert [case_shape(args, i) for i in range(3)] == [[750, 512, 512], [300, 512, 512], [150, 512, 512]]
    assert resolve_target(args) == pytest.approx((1.0, 0.8, 0.8))  # the default run has something to resample
    thin = _arguments("--shape", "20", "64", "64", "--slice-thickness", "10", "--cases", "1")
    assert case_shape(thin, 0) == [8, 64, 64]  # at least 8 slices
    jobs = case_jobs(_arguments("--cases", "2", "--seed", "3"))
    assert [job.synthetic for job in jobs] == [
        {"shape": [750, 512, 512], "spacing": [1.0, 0.8, 0.8], "seed": [3, 0]},
        {"shape": [300, 512, 512], "spacing": [2.5, 0.8, 0.8], "seed": [3, 1]},
    ]
    assert resolve_target(_arguments("--slice-thickness", "2.5")) is None  # uniform: auto is native
    assert resolve_target(_arguments("--slice-thickness", "2.5", "--target-spacing", "1", "1", "1")) == (1.0, 1.0, 1.0)


def test_side_command_passes_the_resolved_target_spacing():
    args = _arguments(*TINY, "--slice-thickness", "1.0", "5.0", "--label-interpolation", "linear")
    target = resolve_target(args)
    command = side_command(args, "resampled", args.dir, target)
    assert command[1:4] == ["-m", "iunet3d.bench.data", "--side"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--side")
    add_arguments(parser)
    side = parser.parse_args(command[3:])
    assert side.side == "resampled" and side.slice_thickness == [1.0, 5.0] and side.label_interpolation == "linear"
    assert tuple(map(float, side.target_spacing)) == target  # numbers, exactly: "auto" is resolved once
    without = side_command(args, "ours", args.dir, None)  # no resolved spacing: the side reads natively
    assert without[without.index("--target-spacing") + 1] == "native"


def test_resampled_side_delivers_patches_at_the_target_spacing(tmp_path):
    from iunet3d.data.convert import run_conversion

    args = _arguments("--cases", "2", "--shape", "16", "40", "40", "--slice-thickness", "1.0", "5.0", "--patch", "8",
                      "16", "16", "--patches", "3", "--workers", "0", "--augmentation", "no-spatial",
                      "--target-spacing", "2", "1", "1", "--dir", str(tmp_path))  # fmt: skip
    report = run_conversion(case_jobs(args), tmp_path / "zarr", progress=False)
    assert report.converted == ["case_0", "case_1"]
    args.side = "resampled"
    result = run_side(args)  # checks every batch's shape: (B, 1, 8, 16, 16) at 2 x 1 x 1 mm
    assert result["patches"] == 3 and result["seconds"] > 0
    args.side = "ours"
    assert run_side(args)["patches"] == 3


def test_format_table_puts_the_sides_side_by_side():
    results = {
        "torchio": SideResult("torchio", 64, 32.0, 2.0, 10.0, 2.5, 4000.0, 3500.0, 3, 5000.0),
        "ours": SideResult("ours", 64, 3.2, 20.0, 1.2, 25.0, 800.0, 350.0, 4, 900.0),
    }
    table = format_table(results, "header")
    assert "| torchio | 64 | 32.00 | 2.00 | 2.50 | 10.00 | 4000 | 3500 | 3 |" in table
    assert "| ours | 64 | 3.20 | 20.00 | 25.00 | 1.20 | 800 | 350 | 4 |" in table
    assert "ours vs TorchIO: 10.00x the patches/s (steady 10.00x), 0.200 of the peak RSS" in table
    assert "(0.100 of its peak PSS)" in table


@pytest.mark.parametrize(
    "arguments",
    [("--patches", "0"), ("--batch-size", "0"), ("--workers", "-1"), ("--cases", "0"),
     ("--samples-per-volume", "0"), ("--patch", "64", "128", "128", "--shape", "40", "96", "96"),
     ("--patch", "32", "32", "32", "--shape", "40", "96", "96", "--slice-thickness", "1", "5"),
     ("--slice-thickness", "0"), ("--slice-thickness", "1", "-2.5"), ("--slice-thickness", "nan"),
     ("--target-spacing", "1", "2"), ("--target-spacing", "fine"), ("--target-spacing", "0", "1", "1"),
     ("--target-spacing", "native"), ("--target-spacing", "2.5", "0.8", "0.8", "--slice-thickness", "2.5"),
     ("--slice-thickness", "2.5", "--sides", "ours,resampled"),
     ("--sides", "ours,nifti"), ("--sides", ""), ("--sides", "ours,ours"), ("--sides", "ours,")],
)  # fmt: skip
def test_bench_data_rejects_bad_arguments_before_any_work(tmp_path, capsys, arguments):
    with pytest.raises(SystemExit) as exited:  # in this process: the same main() the console script runs
        main(["bench", "data", *arguments, "--dir", str(tmp_path / "data")])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("iunet3d: error:")
    assert arguments[0] in message
    assert not (tmp_path / "data").exists()  # validated before writing anything


def test_bench_data_notices_a_changed_slice_thickness_list(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _check_manifest(_arguments(*TINY), data)  # records the default 1.0 2.5 5.0
    _check_manifest(_arguments(*TINY, "--slice-thickness", "1", "2.5", "5"), data)  # the same list: reused
    with pytest.raises(SystemExit) as exited:
        main(["bench", "data", *TINY, "--slice-thickness", "1.0", "2.5", "--dir", str(data)])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--dir" in message and "--slice-thickness" in message
    assert "'slice_thickness': [1.0, 2.5, 5.0]" in message and "'slice_thickness': [1.0, 2.5]}" in message
    assert not (data / "zarr").exists()
    # a directory from before --slice-thickness holds uniform data at --spacing's z: reused for that thickness only
    old = tmp_path / "old"
    old.mkdir()
    (old / "bench-data.json").write_text(json.dumps({"shape": [40, 96, 96], "spacing": [2.5, 0.8, 0.8], "seed": 0}))
    _check_manifest(_arguments(*TINY, "--slice-thickness", "2.5"), old)
    with pytest.raises(ValueError, match="--slice-thickness"):
        _check_manifest(_arguments(*TINY), old)


def test_bench_data_refuses_a_dir_made_with_other_settings(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bench-data.json").write_text(json.dumps({"shape": [8, 8, 8], "spacing": [1.0, 1.0, 1.0], "seed": 0}))
    completed = _bench(*TINY, "--dir", str(data))
    assert completed.returncode == 2
    assert "--dir" in completed.stderr and "Traceback" not in completed.stderr
    assert not (data / "zarr").exists()
