"""`iunet3d bench predict --against monai`: MONAI places the same windows and, given the same weights, blends
to the same probabilities as our sliding window."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from iunet3d.bench.monai_predict import monai_windows, probability_agreement  # noqa: E402
from iunet3d.data.normalization import CTNormalization  # noqa: E402
from iunet3d.data.synth import make_phantom  # noqa: E402
from iunet3d.infer.trained_model import TrainedModel  # noqa: E402
from iunet3d.infer.windows import window_grid  # noqa: E402
from iunet3d.models.segmentation import SegmentationIUNet  # noqa: E402

PATCH = (8, 16, 16)


@pytest.mark.parametrize("shape", [(16, 48, 48), (24, 64, 32)])
def test_monai_places_our_windows_where_the_step_divides_the_span(shape):
    assert monai_windows(shape, PATCH, 0.5) == sorted(window_grid(shape, PATCH, 0.5))


def test_monai_places_other_windows_where_it_does_not():
    """Documented difference: 21 - 8 = 13 is not a multiple of the step 4 (MONAI 0, 4, 8, 12, 13; ours 0, 3, 6,
    10, 13, evenly spaced)."""
    assert monai_windows((21, 16, 16), PATCH, 0.5) != sorted(window_grid((21, 16, 16), PATCH, 0.5))


@pytest.mark.slow
def test_our_blended_probabilities_equal_monais_with_the_same_weights():
    torch.manual_seed(0)
    network = SegmentationIUNet(1, 3, channels=4, architecture=(1, 1, 1, 1),
                                resampling_stride=[(1, 2, 2), (2, 2, 2), (2, 2, 2)], norm=None)  # fmt: skip
    with torch.no_grad():
        for parameter in network.parameters():  # zero-initialised last layers: let the couplings act
            if parameter.abs().max() == 0:
                parameter.normal_(0, 0.1)
    model = TrainedModel(network=network.eval(), class_names=["background", "a", "b"], in_channels=1,
                         patch_size=PATCH, normalization=CTNormalization.window(-1000, 1000), step=0,
                         source=Path("random"))  # fmt: skip
    image, _ = make_phantom((16, 48, 48), (2.5, 0.8, 0.8), seed=2)
    args = argparse.Namespace(patch=list(PATCH), overlap=0.5, batch_size=2)
    agreement = probability_agreement(model, image, args)
    assert agreement["same_windows_prob"] and agreement["prob_shape"] == [16, 48, 48]
    assert agreement["max_prob_diff_same_weights"] < 1e-5
    # MONAI's own Gaussian floors its weights at 1e-3 (ours at ~1e-10): only where far window corners
    # overlap does that show, so the probabilities differ there but not by much, and most labels agree
    assert 0 < agreement["max_prob_diff"] < 0.5 and agreement["labels_agree_prob"] > 0.9
    assert np.isfinite(agreement["max_prob_diff"])
