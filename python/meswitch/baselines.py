"""Delta-compression baselines measured beside meswitch.

* RTN: the same quantizer with no salient channels and no step-size search
  (``CompressionSettings(salient=0, clip_grid=1)``), so it goes through the normal
  artifact path.
* BitDelta: ``sign(delta) * mean(|delta|)`` with one scale per matrix (1 bit per
  parameter plus one f16 scale), built here as dense weights for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from meswitch.checkpoint import open_checkpoint
from meswitch.naming import is_delta_role, tensor_role


def bitdelta_weights(base: str | os.PathLike[str], expert: str | os.PathLike[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the expert's tensors with every delta matrix replaced by its BitDelta approximation.

    Expanded-vocabulary rows and non-matrix tensors are kept exactly, as meswitch does.
    """
    base_ckpt, expert_ckpt = open_checkpoint(base), open_checkpoint(expert)
    for name in expert_ckpt:
        weights = expert_ckpt.get_array(name, widen=True)
        if name in base_ckpt and is_delta_role(tensor_role(name)) and weights.ndim == 2:
            base_weights = base_ckpt.get_array(name, widen=True)
            rows = base_weights.shape[0]
            delta = weights[:rows] - base_weights
            scale = np.float32(np.float16(np.abs(delta).mean()))  # the one f16 scale per matrix
            approx = base_weights + scale * np.where(delta >= 0, 1.0, -1.0).astype(np.float32)
            weights = np.concatenate([approx, weights[rows:]], axis=0)
        yield name, weights


def bitdelta_storage_bits(rows: int, cols: int) -> int:
    return rows * cols + 16
