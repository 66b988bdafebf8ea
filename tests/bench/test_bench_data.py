"""``iunet3d bench data`` end to end on tiny volumes (rates are reported, never asserted), and its memory probe."""

import json
import math
import pickle
import subprocess
import sys

import pytest

from iunet3d.bench.data import SideResult, TreeMemory, format_table, memory_kb, process_tree
from iunet3d.cli import main

TINY = ("--cases", "2", "--shape", "40", "96", "96", "--patch", "16", "32", "32", "--patches", "8", "--workers", "1")


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "iunet3d", "bench", "data", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_bench_data_runs_both_sides_and_reuses_its_data(tmp_path):
    data = tmp_path / "data"
    completed = _bench(*TINY, "--batch-size", "3", "--dir", str(data), "--json")
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for key in ("patches_per_s_ours", "patches_per_s_torchio", "rss_mb_ours", "rss_mb_torchio", "speedup",
                "rss_ratio", "seconds_ours", "seconds_torchio"):  # fmt: skip
        assert math.isfinite(report[key]) and report[key] > 0, key
    # 8 patches in batches of 3: 3 + 3 + 2 on both sides, every batch shape-checked by the side itself
    assert report["patches_ours"] == report["patches_torchio"] == 8
    assert report["speedup"] == pytest.approx(report["patches_per_s_ours"] / report["patches_per_s_torchio"], 1e-2)
    assert report["rss_ratio"] == pytest.approx(report["rss_mb_ours"] / report["rss_mb_torchio"], 1e-2)
    assert report["pss_ratio"] == pytest.approx(report["pss_mb_ours"] / report["pss_mb_torchio"], 1e-2)
    settings = report["settings"]
    assert settings["patch"] == [16, 32, 32] and settings["workers"] == 1 and settings["batch_size"] == 3
    assert settings["queue_max_length"] == 16 and settings["samples_per_volume"] == 8
    for side in ("ours", "torchio"):
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
    table = _bench(*TINY, "--dir", str(data))  # reuses the data, prints the table
    assert table.returncode == 0, table.stderr
    assert "| torchio | 8 |" in table.stdout and "| ours | 8 |" in table.stdout
    assert "ours vs TorchIO:" in table.stdout and "40x96x96" in table.stdout
    assert "writing" not in table.stderr  # complete data is reused, nothing is written again


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
     ("--samples-per-volume", "0"), ("--patch", "64", "128", "128", "--shape", "40", "96", "96")],
)  # fmt: skip
def test_bench_data_rejects_bad_arguments_before_any_work(tmp_path, capsys, arguments):
    with pytest.raises(SystemExit) as exited:  # in this process: the same main() the console script runs
        main(["bench", "data", *arguments, "--dir", str(tmp_path / "data")])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("iunet3d: error:")
    assert arguments[0] in message
    assert not (tmp_path / "data").exists()  # validated before writing anything


def test_bench_data_refuses_a_dir_made_with_other_settings(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bench-data.json").write_text(json.dumps({"shape": [8, 8, 8], "spacing": [1.0, 1.0, 1.0], "seed": 0}))
    completed = _bench(*TINY, "--dir", str(data))
    assert completed.returncode == 2
    assert "--dir" in completed.stderr and "Traceback" not in completed.stderr
    assert not (data / "zarr").exists()
