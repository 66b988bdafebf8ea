"""memcnn's reversible wrapper, imported once, with its known deprecation noise filtered.

memcnn emits ``torch.cuda.amp.custom_fwd/custom_bwd`` FutureWarnings on import and a ``TypedStorage``
UserWarning on every call. Only those messages, and only when issued from memcnn, are filtered.
"""

from __future__ import annotations

import warnings

from torch import nn

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd)", category=FutureWarning)
    from memcnn import InvertibleModuleWrapper

warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning, module=r"memcnn")


def reversible(module: nn.Module, *, disable: bool = False) -> InvertibleModuleWrapper:
    """Wrap an invertible ``module`` (with ``forward`` and ``inverse``) for reversible backprop.

    The wrapper releases the storage of the block's inputs during forward and reconstructs them
    with ``inverse`` during backward. Inputs and outputs are released by default; the iUNet keeps the
    input of its first block and the (inverse-direction) input of its last block, which belong to
    the caller.
    """
    return InvertibleModuleWrapper(module, keep_input=False, keep_input_inverse=False, disable=disable)
