"""Per-case and per-class validation tables: their values, and as W&B tables of a real offline run."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from iunet3d.infer.case_metrics import case_metrics, volume_confusion_counts
from iunet3d.tracking.case_table import CaseResult, CaseTable, ClassSummaryTable, keep_worst_panels, worst_cases
from iunet3d.tracking.error_planes import largest_error_center, three_plane_panel
from iunet3d.tracking.wandb_run import SegmentationPanel, WandbConfig, WandbLogger
from tests.helpers.wandb_records import read_logged_table, read_offline_history

NAMES = ["background", "liver", "tumour"]
NAN = math.nan


def result(case: str, liver: float, tumour: float, panel=None) -> CaseResult:
    """Dice as given; predicted liver volume 10 + its Dice, predicted tumour volume its Dice (0 when NaN)."""
    predicted = {"liver": 10.0 + liver, "tumour": 0.0 if math.isnan(tumour) else tumour}
    return CaseResult(case, (2.5, 0.8, 0.8), {"liver": liver, "tumour": tumour}, predicted,
                      {"liver": 11.0, "tumour": 0.5}, panel)  # fmt: skip


def test_from_counts_gives_dice_and_volumes_and_skips_the_background():
    counts = torch.tensor([[900.0, 5.0, 7.0], [30.0, 10.0, 20.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    case = CaseResult.from_counts("case_1", (2.0, 0.5, 0.5), counts, NAMES)
    assert case.spacing == (2.0, 0.5, 0.5)
    assert case.dice["liver"] == 60 / 90 and math.isnan(case.dice["tumour"])
    assert list(case.dice) == ["liver", "tumour"]
    assert case.predicted_ml == {"liver": 40 * 0.5 / 1000, "tumour": 0.0}
    assert case.reference_ml == {"liver": 50 * 0.5 / 1000, "tumour": 0.0}
    assert case.dice_mean == 60 / 90 and case.panel is None
    with pytest.raises(ValueError, match=r"^counts: expected \(3, 3\)"):
        CaseResult.from_counts("case_1", (2.0, 0.5, 0.5), counts[:2], NAMES)


def test_from_metric_rows_agrees_with_from_counts_on_the_same_volumes():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 3, size=(6, 10, 12))
    prediction = np.where(rng.random(reference.shape) < 0.2, rng.integers(0, 3, size=reference.shape), reference)
    spacing = (2.5, 0.7, 0.9)
    rows = case_metrics("b", prediction, reference, NAMES, spacing) + case_metrics("a", reference, reference, NAMES,
                                                                                   spacing)  # fmt: skip
    from_rows = CaseResult.from_metric_rows("b", spacing, rows)
    from_counts = CaseResult.from_counts("b", spacing, volume_confusion_counts(prediction, reference, 3), NAMES)
    assert from_rows == from_counts
    assert 0 < from_rows.dice["liver"] < 1 and from_rows.dice_mean < 1
    assert CaseResult.from_metric_rows("a", spacing, rows).dice == {"liver": 1.0, "tumour": 1.0}
    with pytest.raises(ValueError, match="^rows: no row of case 'c'"):
        CaseResult.from_metric_rows("c", spacing, rows)


def test_dice_mean_skips_nan_and_worst_cases_put_nan_last():
    results = [result("a", 0.9, NAN), result("b", NAN, NAN), result("c", 0.5, 0.7), result("d", 0.2, 1.0),
               result("e", 0.6, NAN)]  # fmt: skip
    assert results[0].dice_mean == 0.9 and math.isnan(results[1].dice_mean) and results[2].dice_mean == 0.6
    assert worst_cases(results, 3) == ["c", "d", "e"]  # 0.6, 0.6 (input order), 0.6: then a
    assert worst_cases(results, 10) == ["c", "d", "e", "a", "b"]
    assert worst_cases(results, 0) == []
    with pytest.raises(ValueError, match="^n: "):
        worst_cases(results, -1)


def test_keep_worst_panels_drops_the_panels_of_the_better_cases():
    panel = SegmentationPanel("k", np.zeros((2, 2)), np.zeros((2, 2), int), np.ones((2, 2), int), NAMES)
    results = [result("a", 0.1, NAN), result("b", 0.2, NAN, panel), result("c", 0.9, NAN, panel),
               result("d", 0.5, NAN, panel)]  # fmt: skip
    assert keep_worst_panels(results, 2) is results
    assert [r.panel is not None for r in results] == [False, True, False, True]  # "a" had none to keep
    assert [r.panel is not None for r in keep_worst_panels(results, 0)] == [False] * 4


def test_case_table_rows_keep_exact_values_and_the_panel():
    panel = three_plane_panel("val/cases/b", np.zeros((3, 4, 5)), np.zeros((3, 4, 5), int),
                              np.ones((3, 4, 5), int), (1, 2, 3), (1.0, 1.0, 1.0), NAMES)  # fmt: skip
    table = CaseTable("val/cases", NAMES, [result("a", 0.9, NAN), result("b", 1 / 3, 0.25, panel)])
    assert table.columns == ["case", "spacing_mm", "dice_mean", "dice/liver", "predicted_ml/liver",
                             "reference_ml/liver", "dice/tumour", "predicted_ml/tumour", "reference_ml/tumour",
                             "image"]  # fmt: skip
    first, second = table.rows()
    assert first[:6] == ["a", "2.5 x 0.8 x 0.8", 0.9, 0.9, 10.9, 11.0] and math.isnan(first[6])
    assert first[7:] == [0.0, 0.5, None]
    assert second == ["b", "2.5 x 0.8 x 0.8", (1 / 3 + 0.25) / 2, 1 / 3, 10.0 + 1 / 3, 11.0, 0.25, 0.25, 0.5, panel]
    with pytest.raises(ValueError, match=r"^results\[1\]: "):
        CaseTable(
            "val/cases",
            NAMES,
            [result("a", 0.9, NAN), CaseResult("b", (1, 1, 1), {"liver": 1.0}, {"liver": 1.0}, {"liver": 1.0})],
        )


def test_class_summary_counts_only_defined_dice_and_names_the_worst_case():
    results = [result("a", 0.9, NAN), result("b", 0.5, 0.25), result("c", 0.7, 0.75), result("d", 0.5, NAN)]
    summary = ClassSummaryTable("val/classes", NAMES, results)
    assert summary.columns == ["class", "cases", "dice_mean", "dice_median", "dice_min", "worst_case",
                               "predicted_ml_mean", "reference_ml_mean"]  # fmt: skip
    liver, tumour = summary.rows()
    assert liver == ["liver", 4, pytest.approx(0.65), 0.6, 0.5, "b", pytest.approx(10.65), 11.0]
    assert tumour == ["tumour", 2, 0.5, 0.5, 0.25, "b", 0.25, 0.5]
    nothing = ClassSummaryTable("k", NAMES, [result("a", NAN, NAN)]).rows()[0]
    assert nothing[:2] == ["liver", 0] and all(math.isnan(v) for v in nothing[2:5]) and nothing[5] is None


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, "x", 1.0), None])
def test_a_bad_spacing_is_named(spacing):
    with pytest.raises(ValueError, match="^spacing: "):
        CaseResult("a", spacing, {}, {}, {})


@pytest.mark.slow
def test_case_and_class_tables_are_logged_with_images_of_the_worst_cases(tmp_path, wandb_env):
    rng = np.random.default_rng(2)
    spacing = (2.4, 0.8, 0.8)
    results, panels = [], {}
    for index, errors in enumerate((0, 30, 5, 60)):
        label = np.zeros((6, 16, 20), np.int64)
        label[1:5, 3:13, 4:16] = 1
        label[2:4, 6:9, 8:11] = 2
        prediction = label.copy()
        prediction[tuple(rng.integers(0, n, errors) for n in label.shape)] = 1
        results.append(CaseResult.from_counts(f"case_{index}", spacing, volume_confusion_counts(prediction, label, 3),
                                              NAMES))  # fmt: skip
        panels[f"case_{index}"] = (np.zeros(label.shape), label, prediction)
    shown = worst_cases(results, 2)
    assert set(shown) == {"case_1", "case_3"}  # the most errors
    for case in results:
        if case.case in shown:
            image, label, prediction = panels[case.case]
            center = largest_error_center(label, prediction, spacing)
            case.panel = three_plane_panel(f"val/cases/{case.case}", image + rng.normal(size=label.shape), label,
                                           prediction, center, spacing, NAMES)  # fmt: skip
    logger = WandbLogger(WandbConfig(mode="offline", project="iunet3d-tests"), tmp_path, {})
    logger.log_tables([CaseTable("val/cases", NAMES, results), ClassSummaryTable("val/classes", NAMES, results)], 4)
    logger.close()
    sys.modules["wandb"].teardown()

    (row,) = read_offline_history(tmp_path)
    assert row["_step"] == 4 and row["val/cases"]["_type"] == "table-file"
    cases = read_logged_table(tmp_path, row["val/cases"])
    assert cases["columns"] == CaseTable("val/cases", NAMES, results).columns
    assert [line[0] for line in cases["data"]] == ["case_0", "case_1", "case_2", "case_3"]
    for line, case in zip(cases["data"], results, strict=True):
        assert line[1] == "2.4 x 0.8 x 0.8"
        assert line[3] == case.dice["liver"] and line[6] == case.dice["tumour"]
        assert line[5] == case.reference_ml["liver"]
        cell = line[-1]
        if case.case not in shown:
            assert cell is None
            continue
        assert cell["_type"] == "image-file" and cell["caption"].startswith(f"{case.case}: largest error at z=")
        assert (cell["height"], cell["width"]) == case.panel.image.shape
        for mask, expected in (("ground_truth", case.panel.label), ("prediction", case.panel.prediction)):
            pixels = np.asarray(Image.open(cases["files"][cell["masks"][mask]["path"]]))
            np.testing.assert_array_equal(pixels, expected)
        assert (case.panel.label != case.panel.prediction).any()
    classes = read_logged_table(tmp_path, row["val/classes"])
    assert classes["columns"][:3] == ["class", "cases", "dice_mean"]
    assert classes["data"] == ClassSummaryTable("val/classes", NAMES, results).rows()
