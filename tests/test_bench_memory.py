"""``iunet3d bench memory`` end to end at a small size (the claims are checked by the table, not here)."""

import json
import subprocess
import sys

import pytest

from iunet3d.bench.memory import CaseResult, format_table, spread_depth


def test_spread_depth_over_levels():
    assert spread_depth(5, 3) == [2, 2, 1]
    assert spread_depth(30, 3) == [10, 10, 10]
    assert sum(spread_depth(20, 3)) == 20
    with pytest.raises(ValueError, match="depth"):
        spread_depth(2, 3)


def test_format_table_reports_ratios_of_measured_values():
    results = [
        CaseResult(5, "conventional", [2, 2, 1], 400.0, 2.0, None),
        CaseResult(5, "reversible", [2, 2, 1], 100.0, 3.0, 1e-7),
        CaseResult(10, "conventional", [4, 3, 3], 800.0, 4.0, None),
        CaseResult(10, "reversible", [4, 3, 3], 105.0, 6.4, 2e-7),
    ]
    table = format_table(results, "header")
    assert "| 5 | [2, 2, 1] | 400 | 100 | 25.0% | 2.00 | 3.00 | 1.50x | 1.0e-07 |" in table
    assert "| 10 | [4, 3, 3] | 800 | 105 | 13.1% | 4.00 | 6.40 | 1.60x | 2.0e-07 |" in table
    assert "1.00 MB per added coupling layer" in table


@pytest.mark.slow
def test_bench_memory_runs_and_reversible_memory_does_not_grow_with_depth():
    command = [sys.executable, "-m", "iunet3d", "bench", "memory", "--depths", "3", "9",
               "--size", "32", "--channels", "8", "--steps", "1", "--json"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "1x8x32^3" in report["header"] and "cpu" in report["header"]
    cases = {(c["depth"], c["mode"]): c for c in report["cases"]}
    assert set(cases) == {(d, m) for d in (3, 9) for m in ("conventional", "reversible")}
    assert all(c["peak_mb"] > 0 and c["step_s"] > 0 for c in cases.values())
    conventional_growth = cases[9, "conventional"]["peak_mb"] - cases[3, "conventional"]["peak_mb"]
    reversible_growth = cases[9, "reversible"]["peak_mb"] - cases[3, "reversible"]["peak_mb"]
    assert conventional_growth > 5  # each coupling stores activations of about 2 MB here
    assert reversible_growth < 0.25 * conventional_growth
    assert cases[9, "reversible"]["peak_mb"] < cases[9, "conventional"]["peak_mb"]
    assert cases[9, "reversible"]["reconstruction_error"] < 1e-5
