"""``iunet3d synth`` of mixed spacings (``--slice-thickness``, ``--spacing-range``) keeping the field of view,
and the target spacing ``"auto"`` that ``iunet3d info`` reports."""

import argparse

import numpy as np
import pytest

from iunet3d.cli import main
from iunet3d.data import open_dataset
from iunet3d.data.commands import synth_case_options, synth_z_spacings
from iunet3d.data.synth import make_phantom
from tests.helpers.cli import run_cli

SHAPE = ("--shape", "16", "32", "32")  # 16 slices of 2.5 mm: a 40 mm field of view


def synth(out, *extra) -> int:
    return main(["synth", "--out", str(out), *SHAPE, "--workers", "1", "--no-progress", *map(str, extra)])


def info(dataset, capsys) -> str:
    capsys.readouterr()
    assert main(["info", str(dataset)]) == 0
    return capsys.readouterr().out


def synth_args(*extra) -> argparse.Namespace:
    from iunet3d.cli import build_parser

    return build_parser().parse_args(["synth", "--out", "unused", *SHAPE, *map(str, extra)])


def test_slice_thickness_writes_those_z_spacings_keeping_the_field_of_view(tmp_path, capsys):
    assert synth(tmp_path / "mixed", "--cases", 4, "--slice-thickness", 1, 2.5, 5) == 0
    dataset = open_dataset(tmp_path / "mixed")
    cases = list(dataset)
    assert [case.spacing for case in cases] == [(1.0, 0.8, 0.8), (2.5, 0.8, 0.8), (5.0, 0.8, 0.8), (1.0, 0.8, 0.8)]
    assert [case.shape for case in cases] == [(40, 32, 32), (16, 32, 32), (8, 32, 32), (40, 32, 32)]
    assert all(case.shape[0] * case.spacing[0] == 40 for case in cases)  # the field of view is kept
    assert cases[2].info["source"]["synthetic"] == {"shape": [8, 32, 32], "spacing": [5.0, 0.8, 0.8], "seed": [0, 2]}
    assert all(set(case.class_voxel_counts()) >= {1, 2} for case in cases)  # every case holds the organs
    printed = info(tmp_path / "mixed", capsys)
    # median z of 1, 2.5, 5, 1 is 1.75: not more than 3x 0.8, so "auto" keeps the median
    assert '  target spacing "auto" (z, y, x) mm: [1.75, 0.8, 0.8]  (cases are resampled to it)\n' in printed
    assert "  spacing range (z, y, x) mm: 1..5, 0.8..0.8, 0.8..0.8\n" in printed


def test_a_uniform_dataset_is_read_natively(tmp_path, capsys):
    assert synth(tmp_path / "uniform", "--cases", 2, "--spacing", 2, 0.7, 0.7) == 0
    assert [case.shape for case in open_dataset(tmp_path / "uniform")] == [(16, 32, 32)] * 2  # --shape as given
    printed = info(tmp_path / "uniform", capsys)
    expected = '  target spacing "auto" (z, y, x) mm: [2, 0.7, 0.7]  (every case has it: patches are read natively)\n'
    assert expected in printed and "spacing range" not in printed


def test_auto_takes_the_thin_slices_of_a_mostly_thick_slice_dataset():
    args = synth_args("--cases", 5, "--slice-thickness", 5, 5, 1, 5, 5)
    assert [options["shape"][0] for options in synth_case_options(args)] == [8, 8, 40, 8, 8]
    from iunet3d.data.resampling import resolve_target_spacing

    spacings = [options["spacing"] for options in synth_case_options(args)]
    assert resolve_target_spacing("auto", spacings) == pytest.approx((2.6, 0.8, 0.8))  # 10th percentile of z


def test_spacing_range_is_deterministic_and_within_range(tmp_path, capsys):
    args = synth_args("--cases", 6, "--spacing-range", 1, 3, "--seed", 7)
    spacings = synth_z_spacings(args)
    assert spacings == synth_z_spacings(args)  # the same (seed, i), the same spacing
    assert all(1 <= t <= 3 for t in spacings) and len(set(spacings)) == 6
    assert synth_z_spacings(synth_args("--cases", 6, "--spacing-range", 1, 3, "--seed", 8)) != spacings
    assert synth_z_spacings(synth_args("--cases", 3, "--spacing-range", 1, 3, "--seed", 7)) == spacings[:3]
    for options, t in zip(synth_case_options(args), spacings, strict=True):
        assert options["spacing"] == [t, 0.8, 0.8] and options["shape"] == [max(8, round(40 / t)), 32, 32]

    assert synth(tmp_path / "ranged", "--cases", 2, "--spacing-range", 1, 3, "--seed", 7) == 0
    dataset = open_dataset(tmp_path / "ranged")
    assert [case.spacing[0] for case in dataset] == spacings[:2]
    capsys.readouterr()
    assert synth(tmp_path / "ranged", "--cases", 2, "--spacing-range", 1, 3, "--seed", 7) == 0  # a rerun: identical
    assert "0 converted, 2 already complete, 0 failed" in capsys.readouterr().out


def test_slice_thickness_and_spacing_range_are_refused_together(tmp_path, capsys):
    args = ["synth", "--out", tmp_path / "a", "--cases", "2", "--slice-thickness", "1", "--spacing-range", "1", "2"]
    code, error = run_cli(args, capsys)
    assert code == 2 and "argument --spacing-range: not allowed with argument --slice-thickness" in error
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slice-thickness", "0"], "--slice-thickness: expected positive numbers in mm, got 0"),
        (["--slice-thickness", "1", "-2"], "--slice-thickness: expected positive numbers in mm, got 1 -2"),
        (["--slice-thickness", "nan"], "--slice-thickness: expected positive numbers in mm, got nan"),
        (["--slice-thickness", "inf"], "--slice-thickness: expected positive numbers in mm, got inf"),
        (["--spacing-range", "3", "1"], "--spacing-range: expected LOW HIGH in mm with 0 < LOW <= HIGH, got 3 1"),
        (["--spacing-range", "0", "1"], "--spacing-range: expected LOW HIGH in mm with 0 < LOW <= HIGH, got 0 1"),
        (["--spacing-range", "1", "2", "--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
    ],
)
def test_bad_spacings_are_refused_in_one_line_naming_the_argument(tmp_path, capsys, extra, message):
    code, error = run_cli(["synth", "--out", tmp_path / "a", "--cases", "2", *extra], capsys)
    assert code == 2 and error == f"iunet3d: error: {message}"
    assert not (tmp_path / "a").exists()


def test_the_same_seed_at_another_slice_thickness_is_the_same_anatomy_sampled_differently():
    """The phantom is built in mm and scaled to the field of view: body and organs agree across z spacings to
    within the sampling (organ centres snap to voxel centres; lesions are placed on the sampled liver, so they
    may move: not compared)."""
    phantoms = {t: make_phantom((round(40 / t), 32, 32), (t, 0.8, 0.8), seed=(0, 0)) for t in (1.0, 2.5)}
    volumes = {}
    for t, (image, label) in phantoms.items():
        voxel = t * 0.8 * 0.8
        volumes[t] = {"body": (image > -500).sum() * voxel, "liver": np.isin(label, (1, 3)).sum() * voxel}
        volumes[t]["kidney"] = (label == 2).sum() * voxel
    for part in ("body", "liver", "kidney"):
        assert volumes[1.0][part] == pytest.approx(volumes[2.5][part], rel=0.05), part
    thin, thick = (phantoms[t][1] for t in (1.0, 2.5))
    for values in ((1, 3), (2,)):  # the liver's (lesions in it) and kidneys' in-plane footprints agree
        a, b = (np.isin(label, values).any(axis=0) for label in (thin, thick))
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95
