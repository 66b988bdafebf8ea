"""`iunet3d predict --max-memory` bounds the memory the whole command takes, measured as process RSS."""

from __future__ import annotations

import numpy as np
import pytest

from iunet3d.cli import main
from iunet3d.data import open_dataset
from iunet3d.data.synth import SYNTH_CLASS_NAMES, make_phantom
from iunet3d.infer.accumulator import accumulator_bytes
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from iunet3d.infer.windows import window_grid
from tests.helpers.data import store_case
from tests.helpers.train import train_tiny_checkpoint

LIMIT_MB = 12
SHAPE = (48, 192, 192)  # 1.8 M voxels: a 35 MB accumulator with 4 classes


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_growth_mb(argv: list[str]) -> float:
    """Peak RSS of this process while ``iunet3d argv`` runs, above its RSS just before (MB)."""
    return peak_growth_of(lambda: main(argv) == 0)


def peak_growth_of(work) -> float:
    """Peak RSS of this process while ``work()`` (which must return True) runs, above its RSS before (MB)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := current RSS
    before = rss_kb("VmRSS")
    assert work()
    return (rss_kb("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def large_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    _, checkpoint, _ = train_tiny_checkpoint(root)
    image, label = make_phantom(SHAPE, (2.5, 0.8, 0.8), seed=(5, 0))
    store_case(root / "large", "large", image, label, class_names=SYNTH_CLASS_NAMES)
    return root / "large", checkpoint


@pytest.mark.slow
def test_the_max_memory_limit_holds_for_a_volume_whose_accumulator_exceeds_it(large_case, tmp_path):
    dataset, checkpoint = large_case
    accumulator_mb = accumulator_bytes(len(SYNTH_CLASS_NAMES), SHAPE) / 2**20
    assert accumulator_mb > 2.5 * LIMIT_MB
    command = ["predict", "--checkpoint", str(checkpoint), "--input", str(dataset), "--no-progress", "--overlap", "0"]
    main([*command, "--out", str(tmp_path / "warm-up"), "--max-memory", str(LIMIT_MB)])  # one-time allocations
    streamed = peak_growth_mb([*command, "--out", str(tmp_path / "streamed"), "--max-memory", str(LIMIT_MB)])
    in_memory = peak_growth_mb([*command, "--out", str(tmp_path / "in_memory")])
    whole = peak_growth_of(lambda: np.ones(int(accumulator_mb * 2**18), np.float32).sum() > 0)  # an accumulator
    print(f"streamed {streamed:.1f} MB, no limit {in_memory:.1f} MB, accumulator {accumulator_mb:.1f} MB")
    assert whole > 0.8 * accumulator_mb, f"allocating the accumulator took only {whole:.1f} MB: RSS is not measured"
    assert streamed < LIMIT_MB, f"streaming took {streamed:.1f} MB above its start, limit {LIMIT_MB} MB"
    # without a limit the rows fit too: natively only the rows one window covers are held, never the accumulator
    assert in_memory < LIMIT_MB, f"the run without a limit took {in_memory:.1f} MB"
    labels = {name: open_dataset(tmp_path / name).case("large").label_array("prediction")[...]
              for name in ("streamed", "in_memory")}  # fmt: skip
    assert np.array_equal(labels["streamed"], labels["in_memory"])
    model = load_trained_model(checkpoint)
    assert np.array_equal(labels["streamed"], predict_volume(model, open_dataset(dataset).case("large").image_array,
                                                             overlap=0))  # fmt: skip
    assert len(window_grid(SHAPE, model.patch_size, 0)) == 6 * 6 * 6


def test_a_limit_below_what_streaming_needs_is_refused_with_its_minimum(large_case, tmp_path, capsys):
    dataset, checkpoint = large_case
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(tmp_path / "out"),
              "--no-progress", "--max-memory", "0.5"])  # fmt: skip
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "max memory 0.5 MB is below the" in error and "MB that streaming needs with (8, 32, 32) windows" in error
    assert not (tmp_path / "out" / "large").exists()  # nothing that looks complete
