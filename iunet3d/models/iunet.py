"""The fully invertible U-Net (iUNet), with the original library's constructor API."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from iunet3d.models.channel_mixing import InvertibleChannelMixing
from iunet3d.models.coupling import create_standard_module
from iunet3d.models.engines import REVERSIBLE_ENGINES, FusedPass, InferencePass, MemcnnPass, PlainPass
from iunet3d.models.layout import ChannelPlan, format_layout, normalise_architecture, normalise_strides, plan_channels
from iunet3d.models.level_transitions import SplitAndDownsample, UpsampleAndMerge
from iunet3d.models.orthogonal import ORTHOGONAL_METHODS
from iunet3d.models.padding import PADDING_MODES, crop_padding, pad_to_multiple
from iunet3d.models.precision import carried
from iunet3d.models.reconstruction import ReconstructionError, relative_error
from iunet3d.models.resampling import RESAMPLING_INITS, InvertibleDownsampling, InvertibleUpsampling


def _choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


class iUNet(nn.Module):
    """Fully invertible U-Net: x (B, C, *S) -> y (B, C, *S), len(S) == dim, C == in_channels.

    Level ``i`` applies ``architecture[i]`` invertible layers (additive couplings by default) on the
    way down and as many on the way up. Between levels, ``skipped_channels[i]`` channels are kept
    for the skip connection and the rest are downsampled by a learnable orthogonal kernel with
    ``resampling_stride[i]``; upsampling and concatenation mirror this. Every part is trained with
    reversible backprop, so training memory does not grow with depth: ``reversible_engine="fused"`` (the
    default) recomputes each block once in backward and reconstructs its input from that evaluation;
    ``"memcnn"`` uses memcnn's wrapper (the reference); ``disable_custom_gradient=True`` is plain
    autograd, which stores activations. When the blocks compute in reduced precision (autocast, 16-bit
    inputs, TF32) the tensors between them are float64 (``iunet3d.models.precision``), so that
    backward reconstructs them exactly; outputs come back in the input's dtype.

    Spatial sizes that are not multiples of ``downsampling_factors`` are padded (``padding_mode``,
    ``padding_value``) and, with ``revert_input_padding``, cropped back.
    """

    def __init__(
        self,
        in_channels: int,
        architecture: Sequence[int],
        dim: int,
        create_module_fn: Callable[..., nn.Module] = create_standard_module,
        module_kwargs: dict | None = None,
        slice_mode: str = "double",
        learnable_resampling: bool = True,
        resampling_stride=2,
        resampling_method: str = "cayley",
        resampling_init: str | torch.Tensor = "haar",
        resampling_kwargs: dict | None = None,
        learnable_channel_mixing: bool = True,
        channel_mixing_freq: int = -1,
        channel_mixing_method: str = "cayley",
        channel_mixing_kwargs: dict | None = None,
        padding_mode: str | None = "constant",
        padding_value: float = 0,
        revert_input_padding: bool = True,
        disable_custom_gradient: bool = False,
        verbose: int = 1,
        reversible_engine: str = "fused",
    ):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(channel_mixing_freq, int) or channel_mixing_freq < -1:
            raise ValueError(f"channel_mixing_freq must be -1, 0 or a positive int, got {channel_mixing_freq!r}")
        _choice("resampling_method", resampling_method, ORTHOGONAL_METHODS)
        _choice("channel_mixing_method", channel_mixing_method, ORTHOGONAL_METHODS)
        _choice("padding_mode", padding_mode, PADDING_MODES)
        _choice("reversible_engine", reversible_engine, REVERSIBLE_ENGINES)
        if isinstance(resampling_init, np.ndarray):
            resampling_init = torch.from_numpy(resampling_init)
        if not isinstance(resampling_init, torch.Tensor):
            _choice("resampling_init", resampling_init, RESAMPLING_INITS)

        self.in_channels = in_channels
        self.architecture = normalise_architecture(architecture)
        self.dim = dim
        self.num_levels = len(self.architecture)
        self.slice_mode = slice_mode
        self.resampling_stride = normalise_strides(resampling_stride, dim, self.num_levels)
        plan = plan_channels(in_channels, self.resampling_stride, slice_mode)
        if min(plan.channels) < 2:
            raise ValueError(f"in_channels={in_channels} is too few: every level needs >= 2 channels to split")
        self.channels = list(plan.channels)
        self.skipped_channels = list(plan.skipped)
        self.channels_before_downsampling = list(plan.down)
        per_channel_init = isinstance(resampling_init, torch.Tensor) and resampling_init.dim() == 3
        if per_channel_init and any(resampling_init.shape[0] != d for d in self.channels_before_downsampling):
            raise ValueError(
                f"resampling_init of shape {tuple(resampling_init.shape)} holds one matrix per channel, but the "
                f"levels downsample {self.channels_before_downsampling} channels; pass one (m, m) matrix"
            )
        self.downsampling_factors = tuple(
            math.prod(stride[axis] for stride in self.resampling_stride) for axis in range(dim)
        )
        self.padding_mode = padding_mode
        self.padding_value = padding_value
        self.revert_input_padding = revert_input_padding
        self.disable_custom_gradient = disable_custom_gradient
        self.reversible_engine = reversible_engine
        self.verbose = verbose
        self._memcnn_wrappers: dict[int, nn.Module] = {}
        self._warned_shapes: set[tuple[int, ...]] = set()

        module_kwargs = dict(module_kwargs or {})
        resampling_kwargs = dict(resampling_kwargs or {})
        channel_mixing_kwargs = dict(channel_mixing_kwargs or {})
        mixing = learnable_channel_mixing and channel_mixing_freq != 0

        def level_blocks(level: int, side: str) -> nn.ModuleList:
            blocks = nn.ModuleList()
            for j in range(self.architecture[level]):
                context = dict(dim=dim, module_index=j, LR=side, level=level, architecture=self.architecture)
                blocks.append(create_module_fn(self.channels[level], **context, **module_kwargs))
                if mixing and channel_mixing_freq > 0 and (j + 1) % channel_mixing_freq == 0:
                    blocks.append(self._mixing(level, channel_mixing_method, channel_mixing_kwargs))
            return blocks

        self.encoder_levels = nn.ModuleList()
        self.decoder_levels = nn.ModuleList()
        for level in range(self.num_levels):
            encoder, decoder = level_blocks(level, "L"), level_blocks(level, "R")
            if mixing and channel_mixing_freq == -1 and level < self.num_levels - 1:
                # one mixing per level: before the split, mirrored right after the merge
                encoder.append(self._mixing(level, channel_mixing_method, channel_mixing_kwargs))
                decoder.insert(0, self._mixing(level, channel_mixing_method, channel_mixing_kwargs))
            self.encoder_levels.append(encoder)
            self.decoder_levels.append(decoder)

        resampling = dict(method=resampling_method, init=resampling_init, learnable=learnable_resampling)
        resampling.update(resampling_kwargs)
        self.splits = nn.ModuleList()
        self.merges = nn.ModuleList()
        for level, stride in enumerate(self.resampling_stride):
            k, d = self.skipped_channels[level], self.channels_before_downsampling[level]
            self.splits.append(SplitAndDownsample(k, InvertibleDownsampling(d, stride, **resampling)))
            self.merges.append(
                UpsampleAndMerge(k, InvertibleUpsampling(self.channels[level + 1], stride, **resampling))
            )
        self._register_load_state_dict_pre_hook(_rename_memcnn_keys)

    def _mixing(self, level: int, method: str, kwargs: dict) -> InvertibleChannelMixing:
        return InvertibleChannelMixing(self.channels[level], method=method, dim=self.dim, **kwargs)

    @property
    def reversible_engine(self) -> str:
        """``"fused"`` or ``"memcnn"``: how backprop reconstructs activations (unless
        ``disable_custom_gradient``). May be changed on a built network; the state dict is the same."""
        return self._reversible_engine

    @reversible_engine.setter
    def reversible_engine(self, engine: str) -> None:
        _choice("reversible_engine", engine, REVERSIBLE_ENGINES)
        self._reversible_engine = engine

    @property
    def _uses_memcnn(self) -> bool:
        return not self.disable_custom_gradient and self.reversible_engine == "memcnn"

    def _new_pass(self) -> PlainPass | FusedPass | MemcnnPass:
        """How this call applies the invertible layers (a new tape per call)."""
        if self.disable_custom_gradient or not torch.is_grad_enabled():
            return PlainPass()
        if self.reversible_engine == "fused":
            return FusedPass()
        # The caller owns the input of forward() and of inverse(): memcnn must not free those.
        return MemcnnPass(self._memcnn_wrappers, (self.encoder_levels[0][0], self.decoder_levels[0][-1]))

    # ----- forward direction -------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, reuse_input: bool = False) -> torch.Tensor:
        """x: (B, in_channels, *S) -> (B, in_channels, *S); padded internally if needed.

        Without gradients (inference) the blocks run through ``InferencePass``: the couplings update their
        input in place and the splits hand back views, on a copy of ``x``; with ``reuse_input`` (a caller
        that gives ``x`` up, e.g. features it just computed) on ``x`` itself, which is then overwritten.
        With gradients ``reuse_input`` changes nothing."""
        padded, amounts = self._pad(x)
        run = self._new_pass()
        if isinstance(run, PlainPass) and not torch.is_grad_enabled():
            run = InferencePass()
            if padded is x and not reuse_input:
                padded = x.clone()
        y = run.outputs([self._decode(self._encode(carried(padded), run), run)])[0].to(x.dtype)
        y = crop_padding(y, amounts) if self.revert_input_padding else y
        return self._guard_outputs(x, amounts, [y])[0]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, C_0, *S) -> [skip_0 (B, k_0, *S), ..., skip_{L-2}, bottom (B, C_{L-1}, *S_{L-1})].

        The input is padded as in ``forward``; the codes are at the padded size.
        """
        padded, amounts = self._pad(x)
        run = self._new_pass()
        codes = [code.to(x.dtype) for code in run.outputs(self._encode(carried(padded), run))]
        return self._guard_outputs(x, amounts, codes)

    def decode(self, *codes: torch.Tensor) -> torch.Tensor:
        """The codes of ``encode`` -> (B, C_0, *S_padded). The caller's codes are left intact."""
        codes = self._unpack(codes)
        dtype = codes[0].dtype if codes else None
        run = self._new_pass()
        carried_codes = [carried(code) for code in codes]
        if isinstance(run, MemcnnPass):  # memcnn releases its blocks' inputs
            carried_codes = [c.clone() if c is code else c for c, code in zip(carried_codes, codes, strict=True)]
        return run.outputs([self._decode(carried_codes, run)])[0].to(dtype)

    def _guard_outputs(
        self, x: torch.Tensor, padding: list[tuple[int, int]], outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """memcnn engine: hand the caller aliases of the outputs and check, when backward reaches them,
        that the caller's input was not modified in place since forward.

        memcnn recomputes from the kept input and sets ``.grad`` on its outputs; without this, an in-place
        change of ``x`` would give silently wrong gradients, and the caller's output would carry a stray
        ``.grad``. The fused engine never reads the caller's input in backward (it reconstructs it).
        """
        if not self._uses_memcnn or not torch.is_grad_enabled():
            return outputs
        outputs = [output.view_as(output) for output in outputs]
        if not any(before or after for before, after in padding):  # the first block kept the caller's x
            version = x._version

            def check_input_unchanged(grad: torch.Tensor) -> torch.Tensor:
                if x._version != version:
                    raise RuntimeError(
                        "iUNet: the input tensor was modified in place after forward; its reversible backward "
                        "recomputes from it. Pass a copy (x.clone()) if you need to change it."
                    )
                return grad

            for output in outputs:
                if output.requires_grad:
                    output.register_hook(check_input_unchanged)
        return outputs

    def _encode(self, x: torch.Tensor, run) -> list[torch.Tensor]:
        codes = []
        for level in range(self.num_levels):
            for block in self.encoder_levels[level]:
                x = run(block, x)
            if level < self.num_levels - 1:
                skip, x = run(self.splits[level], x)
                codes.append(skip)
        codes.append(x)
        return codes

    def _decode(self, codes: Sequence[torch.Tensor], run) -> torch.Tensor:
        self._check_codes(codes)
        codes = list(codes)
        x = codes.pop()
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                x = run(self.merges[level], codes.pop(), x)  # the pass holds no reference to a used skip
            for block in self.decoder_levels[level]:
                x = run(block, x)
        return x

    # ----- inverse direction -------------------------------------------------------------------

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of ``forward``: y (B, in_channels, *S) -> x (B, in_channels, *S).

        Exact when no padding was needed. Otherwise ``y`` is padded again before inverting and the
        result is cropped, which only approximates the padded region ``forward`` discarded.
        """
        padded, amounts = self._pad(y)
        run = self._new_pass()
        x = run.outputs([self._inverse_encode(self._inverse_decode(carried(padded), run), run)])[0].to(y.dtype)
        return crop_padding(x, amounts) if self.revert_input_padding else x

    def _inverse_decode(self, y: torch.Tensor, run) -> list[torch.Tensor]:
        codes = []
        for level in range(self.num_levels):
            for block in reversed(self.decoder_levels[level]):
                y = run.inverse(block, y)
            if level < self.num_levels - 1:
                skip, y = run.inverse(self.merges[level], y)
                codes.append(skip)
        codes.append(y)
        return codes

    def _inverse_encode(self, codes: Sequence[torch.Tensor], run) -> torch.Tensor:
        codes = list(codes)
        x = codes.pop()
        for level in reversed(range(self.num_levels)):
            if level < self.num_levels - 1:
                x = run.inverse(self.splits[level], codes.pop(), x)
            for block in reversed(self.encoder_levels[level]):
                x = run.inverse(block, x)
        return x

    # ----- numerical health --------------------------------------------------------------------

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> ReconstructionError:
        """How well the network still inverts itself at ``x`` (B, in_channels, *S): relative errors
        ``|x' - x| / |x|`` of ``x' = inverse(forward(x))``, and per level of the codes recovered by
        inverting the decoder (level 0 at the top).

        Reversible backprop reconstructs activations by these same inverses, so a large error means its
        gradients are wrong. Runs in the current mode and autocast state (those of training, when called
        there) and leaves every buffer as it was. Float32 networks measure about 1e-7..1e-5.
        """
        buffers = {name: buffer.clone() for name, buffer in self.named_buffers()}
        try:
            padded, _ = self._pad(x, warn=False)
            run = PlainPass()
            padded = carried(padded, for_backward=True)  # as training carries them
            codes = self._encode(padded, run)
            recovered = self._inverse_decode(self._decode(codes, run), run)
            levels = tuple(relative_error(back, code) for back, code in zip(recovered, codes, strict=True))
            total = relative_error(self._inverse_encode(recovered, run), padded)
        finally:
            for name, buffer in self.named_buffers():
                buffer.copy_(buffers[name])
        return ReconstructionError(total=total, levels=levels)

    # ----- helpers -----------------------------------------------------------------------------

    def _pad(self, x: torch.Tensor, warn: bool = True) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Validate x (B, C, *S) and pad it to multiples of the downsampling factors."""
        if not isinstance(x, torch.Tensor) or x.dim() != self.dim + 2 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"iUNet(dim={self.dim}, in_channels={self.in_channels}) expects input of shape "
                f"(B, {self.in_channels}, {', '.join('S' * self.dim)}), got {shape}"
            )
        padded, amounts = pad_to_multiple(x, self.downsampling_factors, self.padding_mode, self.padding_value)
        if padded is x:
            if x.requires_grad and self._uses_memcnn:
                # memcnn sets .grad on its input and also returns that gradient: a leaf would get it
                # twice, a non-leaf would carry a stray .grad. It only ever sees this alias.
                padded = x.view_as(x)
        elif warn and self.verbose and tuple(x.shape[2:]) not in self._warned_shapes:
            self._warned_shapes.add(tuple(x.shape[2:]))
            warnings.warn(
                f"iUNet: input size {tuple(x.shape[2:])} is padded to {tuple(padded.shape[2:])} "
                f"(multiples of {self.downsampling_factors}); pass divisible sizes to avoid the copy",
                stacklevel=2,
            )
        return padded, amounts

    def _unpack(self, codes: Sequence) -> list[torch.Tensor]:
        if len(codes) == 1 and isinstance(codes[0], list | tuple):
            codes = codes[0]
        return list(codes)

    def _check_codes(self, codes: Sequence[torch.Tensor]) -> None:
        if len(codes) != self.num_levels:
            raise ValueError(f"decode expects {self.num_levels} codes (one per level), got {len(codes)}")

    def layout(self) -> str:
        """The layout text of ``print_layout``."""
        plan = ChannelPlan(tuple(self.channels), tuple(self.skipped_channels), tuple(self.channels_before_downsampling))
        return format_layout(plan, self.architecture)

    def print_layout(self) -> None:
        """Print channels per level and the splits, as the original library does."""
        print(self.layout())


def _rename_memcnn_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before the engines existed kept every block inside memcnn's wrapper
    (``<block>._fn.<name>``); the blocks now sit directly in the levels."""
    for key in [k for k in state_dict if k.startswith(prefix) and "._fn." in k[len(prefix) :]]:
        state_dict[prefix + key[len(prefix) :].replace("._fn.", ".")] = state_dict.pop(key)
