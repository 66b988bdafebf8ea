"""The ``"memcnn"`` engine: memcnn's reversible wrapper, kept as the reference the fused engine is
checked against (``iUNet(..., reversible_engine="memcnn")``).

memcnn computes each block's inverse and then re-runs its forward with grad (three evaluations of a
coupling function per step, against two for the fused engine), casts block inputs to float32 and turns
autocast off inside them, frees the storage of block inputs, and does not support
``torch.autograd.grad`` or a second backward. It also emits ``torch.cuda.amp.custom_fwd/custom_bwd``
FutureWarnings on import and a ``TypedStorage`` UserWarning on every call: only those messages, and only
when issued from memcnn, are filtered. Imported only when this engine is used.
"""

from __future__ import annotations

import warnings

from torch import nn

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd)", category=FutureWarning)
    from memcnn import InvertibleModuleWrapper

warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning, module=r"memcnn")


def memcnn_wrapper(module: nn.Module, *, keep_input: bool = False, keep_input_inverse: bool = False) -> nn.Module:
    """Wrap an invertible ``module`` (with ``forward`` and ``inverse``) for memcnn's reversible backprop.

    The wrapper releases the storage of the block's inputs during forward and reconstructs them with
    ``inverse`` during backward, unless ``keep_input`` (forward) or ``keep_input_inverse`` (inverse) is
    set: the iUNet keeps the inputs that belong to the caller.
    """
    return InvertibleModuleWrapper(module, keep_input=keep_input, keep_input_inverse=keep_input_inverse)
