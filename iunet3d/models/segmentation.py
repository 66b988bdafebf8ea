"""The segmentation network: input convolution -> iUNet -> output convolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from iunet3d.models.iunet import iUNet
from iunet3d.models.reconstruction import ReconstructionError

#: ``reversible_engine`` of the segmentation network: the iUNet's engines, or "none" for plain autograd.
SEGMENTATION_ENGINES = ("fused", "memcnn", "none")


class SegmentationIUNet(nn.Module):
    """Image (B, in_channels, D, H, W) -> class logits (B, num_classes, D, H, W).

    A 3x3x3 convolution lifts the image to ``channels`` feature channels, the iUNet transforms them
    invertibly (``architecture[i]`` couplings per level, ``resampling_stride[i]`` between levels i and
    i + 1), and a 1x1x1 convolution maps them to class logits. Only the iUNet is reversible (through
    ``reversible_engine``: ``"fused"``, ``"memcnn"``, or ``"none"`` for plain autograd); the two
    convolutions are ordinary layers whose activations autograd stores (one feature map each).

    Spatial sizes should be multiples of ``downsampling_factors``; others are padded inside the iUNet.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 16,
        architecture: Sequence[int] = (2, 2, 2),
        resampling_stride: Sequence[Sequence[int]] | Sequence[int] | int = 2,
        block_depth: int = 2,
        kernel_size: int = 3,
        norm: str | None = "group",
        num_groups: int = 8,
        channel_mixing_freq: int = -1,
        reversible_engine: str = "fused",
    ):
        super().__init__()
        if reversible_engine not in SEGMENTATION_ENGINES:
            raise ValueError(f"reversible_engine must be one of {SEGMENTATION_ENGINES}, got {reversible_engine!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background and a class), got {num_classes!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_conv = nn.Conv3d(in_channels, channels, kernel_size=3, padding=1)
        self.iunet = iUNet(
            in_channels=channels,
            architecture=tuple(architecture),
            dim=3,
            resampling_stride=_strides(resampling_stride),
            module_kwargs=dict(block_depth=block_depth, kernel_size=kernel_size, norm=norm, num_groups=num_groups),
            channel_mixing_freq=channel_mixing_freq,
            verbose=0,
            disable_custom_gradient=reversible_engine == "none",
            reversible_engine="fused" if reversible_engine == "none" else reversible_engine,
        )
        self.output_conv = nn.Conv3d(channels, num_classes, kernel_size=1)

    @property
    def downsampling_factors(self) -> tuple[int, int, int]:
        """Spatial sizes that are multiples of these need no padding: (z, y, x)."""
        return tuple(self.iunet.downsampling_factors)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, in_channels, D, H, W) -> logits (B, num_classes, D, H, W)."""
        if image.dim() != 5 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"SegmentationIUNet expects images of shape (B, {self.in_channels}, D, H, W), got {tuple(image.shape)}"
            )
        return self.output_conv(self.iunet(self.input_conv(image), reuse_input=True))

    @torch.no_grad()
    def reconstruction_error(self, image: torch.Tensor) -> ReconstructionError:
        """How exactly the iUNet inverts itself on the features of ``image`` (B, in_channels, D, H, W): see
        ``iUNet.reconstruction_error``. Runs under the caller's autocast state."""
        return self.iunet.reconstruction_error(self.input_conv(image))


def _strides(stride):
    """Per-level strides as the iUNet takes them: TOML gives lists of lists, the iUNet a list of tuples."""
    if isinstance(stride, Sequence) and stride and all(isinstance(s, Sequence) for s in stride):
        return [tuple(s) for s in stride]
    return stride
