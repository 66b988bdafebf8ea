"""Run under torchrun (gloo): gradients of the reversible segmentation iUNet through DDP, for both engines.

Each of 2 ranks takes half of a fixed batch of 4 patches, either in one micro-batch or in two with
``no_sync`` on the first (gradient accumulation); rank r saves its gradients to
``OUT/grads-<engine>-<mode>-<r>.pt``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from iunet3d.models.segmentation import SegmentationIUNet
from iunet3d.train.loss import DiceCELoss

ENGINES = ("fused", "memcnn")
MODES = ("whole", "accumulated")


def network_and_batch(engine: str = "fused") -> tuple[SegmentationIUNet, torch.Tensor, torch.Tensor]:
    """The same non-trivial network (zero-initialised layers perturbed) and batch in every process."""
    torch.manual_seed(0)
    network = SegmentationIUNet(1, 4, channels=8, architecture=(2, 1, 1), resampling_stride=[[1, 2, 2], [2, 2, 2]],
                                reversible_engine=engine)  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    image = torch.randn(4, 1, 8, 32, 32, generator=generator)
    label = torch.randint(0, 4, (4, 8, 32, 32), generator=generator)
    return network, image, label


def gradients(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.grad.detach().clone() for name, parameter in network.named_parameters()}


def micro_batches(rank: int, mode: str) -> list[slice]:
    """Rank ``rank``'s half of the batch: one micro-batch, or two of one patch each (accumulated)."""
    mine = slice(2 * rank, 2 * rank + 2)
    return [mine] if mode == "whole" else [slice(mine.start, mine.start + 1), slice(mine.start + 1, mine.stop)]


def main(out: Path) -> None:
    from iunet3d.distributed import setup_distributed, teardown_distributed

    distributed = setup_distributed("cpu")
    rank = distributed.rank
    loss_function = DiceCELoss()
    for engine in ENGINES:
        for mode in MODES:
            network, image, label = network_and_batch(engine)
            model = DistributedDataParallel(network)
            micros = micro_batches(rank, mode)
            for index, micro in enumerate(micros):
                last = index == len(micros) - 1
                with contextlib.nullcontext() if last else model.no_sync():
                    (loss_function(model(image[micro]), label[micro]) / len(micros)).backward()
            torch.save(gradients(network), out / f"grads-{engine}-{mode}-{rank}.pt")
    teardown_distributed(distributed)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
