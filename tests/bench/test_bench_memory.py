"""``iunet3d bench memory`` end to end at a small size (the claims are checked by the table, not here)."""

import json
import subprocess
import sys

import pytest

from iunet3d.bench.memory import CaseResult, format_table, spread_depth
from iunet3d.cli import main


def test_spread_depth_over_levels():
    assert spread_depth(5, 3) == [2, 2, 1]
    assert spread_depth(30, 3) == [10, 10, 10]
    assert sum(spread_depth(20, 3)) == 20
    with pytest.raises(ValueError, match="depth"):
        spread_depth(2, 3)


def test_format_table_reports_ratios_of_measured_values():
    results = [
        CaseResult(5, "conventional", [2, 2, 1], 400.0, 2.0, None),
        CaseResult(5, "memcnn", [2, 2, 1], 100.0, 3.2, None),
        CaseResult(5, "fused", [2, 2, 1], 80.0, 2.6, 1e-7),
        CaseResult(10, "conventional", [4, 3, 3], 800.0, 4.0, None),
        CaseResult(10, "memcnn", [4, 3, 3], 105.0, 6.4, None),
        CaseResult(10, "fused", [4, 3, 3], 84.0, 5.2, 2e-7),
    ]
    table = format_table(results, "header")
    assert "CPU time" not in table  # none measured (as on CUDA)
    assert ("| 5 | [2, 2, 1] | 400 | 100 | 80 | 2.00 | 3.20 | 2.60 | 25.0% | 20.0% | 80.0% | 1.60x | 1.30x | 0.81x "
            "| 1.0e-07 |") in table  # fmt: skip
    assert "| 10 | [4, 3, 3] | 800 | 105 | 84 | 4.00 | 6.40 | 5.20 | 13.1% | 10.5% | 80.0% | 1.60x | 1.30x |" in table
    assert "fused peak growth: 0.80 MB per added coupling layer" in table
    assert "memcnn peak growth: 1.00 MB per added coupling layer" in table


def test_cpu_seconds_get_their_own_ratios():
    results = [
        CaseResult(5, "conventional", [2, 2, 1], 400.0, 2.0, None, cpu_s=3.0),
        CaseResult(5, "memcnn", [2, 2, 1], 100.0, 3.2, None, cpu_s=6.0),
        CaseResult(5, "fused", [2, 2, 1], 80.0, 2.6, 1e-7, cpu_s=4.5),
    ]
    table = format_table(results, "header")
    assert "| memcnn/conventional CPU time | fused/conventional CPU time | fused/memcnn CPU time |" in table
    assert "| 1.60x | 1.30x | 0.81x | 2.00x | 1.50x | 0.75x | 1.0e-07 |" in table


def test_a_failed_mode_is_reported_not_hidden():
    results = [
        CaseResult(5, "conventional", [2, 2, 1], 400.0, 2.0, None),
        CaseResult(5, "memcnn", [2, 2, 1], None, None, None, "RuntimeError: expected scalar type Float"),
        CaseResult(5, "fused", [2, 2, 1], 80.0, 2.6, 1e-7),
    ]
    table = format_table(results, "header")
    assert "| 5 | [2, 2, 1] | 400 | failed | 80 | 2.00 | failed | 2.60 | n/a | 20.0% | n/a | n/a | 1.30x | n/a |" in (
        table
    )
    assert "memcnn failed at depth 5: RuntimeError: expected scalar type Float" in table


@pytest.mark.slow
def test_bench_memory_runs_every_engine_and_reversible_memory_does_not_grow_with_depth():
    command = [sys.executable, "-m", "iunet3d", "bench", "memory", "--depths", "3", "9",
               "--size", "32", "--channels", "8", "--steps", "1", "--json"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "1x8x32^3" in report["header"] and "cpu" in report["header"] and "fp32" in report["header"]
    cases = {(c["depth"], c["mode"]): c for c in report["cases"]}
    assert set(cases) == {(d, m) for d in (3, 9) for m in ("conventional", "memcnn", "fused")}
    assert all(c["peak_mb"] > 0 and c["step_s"] > 0 and c["cpu_s"] > 0 and c["error"] is None for c in cases.values())
    conventional_growth = cases[9, "conventional"]["peak_mb"] - cases[3, "conventional"]["peak_mb"]
    assert conventional_growth > 5  # each coupling stores activations of about 2 MB here
    for engine in ("memcnn", "fused"):
        growth = cases[9, engine]["peak_mb"] - cases[3, engine]["peak_mb"]
        assert growth < 0.25 * conventional_growth, engine
        assert cases[9, engine]["peak_mb"] < cases[9, "conventional"]["peak_mb"], engine
    assert cases[9, "fused"]["reconstruction_error"] < 1e-5


@pytest.mark.parametrize(("arguments", "message"), [(["--precision", "fp8"], "--precision"),
                                                    (["--modes", "checkpoint"], "--modes")])  # fmt: skip
def test_bench_memory_rejects_bad_arguments_in_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "memory", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
