"""The base's weights in the dtype they are served in: which dtype, and the tensors loaded in it.

The matrices (every linear, the embedding, ``lm_head``) are held in the checkpoint's own
16-bit dtype, float16 or bfloat16, so a base takes what ``meswitch plan`` counts for it
(2 bytes a parameter); a float32 checkpoint stays float32. The one-dimensional tensors
(norm weights, biases) are widened to float32 whatever the dtype: they are a few KiB a
layer, and the norms and the residual stream they act on run in float32.

torch is imported by the functions, not here, so the command line reads
:data:`DTYPE_NAMES` without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import torch

    from meswitch.checkpoint import Checkpoint

#: The dtypes the base may be served in, by name (``"auto"`` besides: the checkpoint's own).
DTYPE_NAMES = ("float16", "bfloat16", "float32")
#: safetensors dtype -> name in :data:`DTYPE_NAMES`.
_STORED = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype the base's matrices are stored in.

    Raises
    ------
    ValueError
        The matrices are stored in more than one float dtype (the message names a tensor of
        each), or in none.
    """
    import torch

    example: dict[str, str] = {}  # stored dtype -> a matrix stored in it
    for name in checkpoint:
        info = checkpoint.info(name)
        if info["dtype"] in _STORED and len(info["shape"]) == 2:
            example.setdefault(info["dtype"], name)
    if len(example) != 1:
        found = ", ".join(f"{dtype} ({name})" for dtype, name in sorted(example.items())) or "none"
        raise ValueError(f"{checkpoint.path}: dtype='auto' needs the base's matrices in one float dtype; "
                         f"found {found}: give the dtype explicitly")
    return getattr(torch, _STORED[next(iter(example))])


def resolve_dtype(requested: Any, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype to serve the base in: ``requested``, or the checkpoint's own for ``"auto"``.

    Parameters
    ----------
    requested
        ``"auto"``, a name in :data:`DTYPE_NAMES`, or ``torch.float16`` / ``torch.bfloat16`` /
        ``torch.float32``.

    Raises
    ------
    ValueError
        Anything else (the message lists what is accepted), or ``"auto"`` over a checkpoint
        stored in mixed dtypes.
    """
    import torch

    if isinstance(requested, str) and requested == "auto":
        return checkpoint_dtype(checkpoint)
    accepted = {getattr(torch, name): name for name in DTYPE_NAMES}
    if isinstance(requested, str) and requested in DTYPE_NAMES:
        return getattr(torch, requested)
    if isinstance(requested, torch.dtype) and requested in accepted:
        return requested
    raise ValueError(f"dtype must be 'auto', one of {', '.join(DTYPE_NAMES)} or the torch dtype of one, "
                     f"got {requested!r}")


def load_base_weights(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the base on ``device``: matrices in ``dtype``, one-dimensional tensors in float32.

    Each tensor is copied out of the checkpoint's mapping (converted when its stored dtype is
    another) and the mapping's pages are dropped after it, so loading holds one copy of the
    base plus one tensor in flight, never a float32 copy of the whole.
    """
    import torch

    weights = {}
    for name in checkpoint:
        owned = np.array(checkpoint.get_array(name))  # a copy: the mapping is read-only
        if owned.dtype == ml_dtypes.bfloat16:  # torch takes bfloat16 through its bits
            stored = torch.from_numpy(owned.view(np.uint16)).view(torch.bfloat16)
        else:
            stored = torch.from_numpy(owned)
        weights[name] = stored.to(device=device, dtype=dtype if stored.dim() >= 2 else torch.float32)
        checkpoint.release(name)
    return weights
