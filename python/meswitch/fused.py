"""Run base + compressed expert without decompressing: linears multiply from the packed codes.

:func:`load_fused_model` builds the expert's architecture, puts the base weights in
it, and replaces every linear whose delta is stored compressed by a
:class:`DeltaLinear`: ``y = x @ W_base^T + x @ dequant(Q)^T + x[:, idx] @ S^T``, the
last two terms by the fused CPU kernel (``meswitch.ops.delta_matmul``) straight from
the artifact's mapped shards. Embedding tables are lookups, not products, so their
delta is dequantized once (a table, not a GEMM).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from meswitch.artifact import ExpertArtifact, load_artifact
from meswitch.checkpoint import open_checkpoint
from meswitch.naming import module_name, tensor_role


def _torch_module():
    import torch

    return torch


class DeltaLinear(_torch_module().nn.Module):
    """A linear layer computing base + compressed delta with the fused kernel.

    Parameters
    ----------
    base_weight
        float32 ``[base_rows, cols]`` base weight (a torch tensor).
    artifact, weight
        The artifact and the weight's name; its pieces stay in the artifact's mapping.
    extra_rows
        Optional float32 ``[extra, cols]`` rows past the base's (expanded vocabulary).
    bias
        Optional bias of the expert.
    """

    def __init__(self, base_weight, artifact: ExpertArtifact, weight: str, extra_rows=None, bias=None) -> None:
        torch = _torch_module()
        super().__init__()
        self.register_buffer("base_weight", base_weight.contiguous(), persistent=False)
        self.register_buffer("extra_rows", extra_rows, persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.artifact, self.weight_name = artifact, weight
        self.pieces = (artifact, weight)
        entry = artifact.tensors[weight]
        self.in_features = entry["cols"]
        self.out_features = entry["rows"] + (0 if extra_rows is None else extra_rows.shape[0])

    def forward(self, x):
        torch = _torch_module()
        from meswitch.ops import delta_matmul

        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.float32).contiguous()
        out = flat @ self.base_weight.T  # the base GEMM, once for all tokens (BLAS)
        delta_matmul(flat, self.pieces, out=out)  # += the expert's delta, from the packed codes
        if self.extra_rows is not None:
            out = torch.cat([out, flat @ self.extra_rows.T], dim=1)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        entry = self.artifact.tensors[self.weight_name]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={entry['bits']}, "
                f"group_size={entry['group_size']}, salient={entry['salient']}")


def load_fused_model(base: str | os.PathLike[str], artifact: str | os.PathLike[str] | ExpertArtifact):
    """The expert as a transformers model whose linears run the fused delta kernel.

    Returns
    -------
    (model, tokenizer)
        float32 model on CPU in eval mode; tokenizer from the artifact (``None`` if it has none).
    """
    torch = _torch_module()
    from meswitch.artifact import model_from_weights

    expert = artifact if isinstance(artifact, ExpertArtifact) else load_artifact(artifact)
    expert.check_base(base)
    base_ckpt = open_checkpoint(base)

    def initial_weights():
        for name, entry in expert.tensors.items():
            kind = entry["kind"]
            if kind == "same":
                yield name, base_ckpt.get_array(name, widen=True)
            elif kind == "full":
                yield name, np.asarray(expert.stored(f"{name}.full"), dtype=np.float32)
            elif tensor_role(name) == "embedding":  # a lookup table: dequantize once
                yield name, next(w for n, w in expert.weights(base, check_base=False) if n == name)
            else:  # placeholder of the right shape; the module is replaced below
                yield name, np.zeros(entry["shape"], dtype=np.float32)

    model, tokenizer = model_from_weights(expert.path / "expert", initial_weights())
    modules = dict(model.named_modules())
    for name, entry in expert.tensors.items():
        if entry["kind"] != "delta" or tensor_role(name) == "embedding":
            continue
        path = module_name(name)
        linear = modules[path]
        base_weight = torch.from_numpy(np.array(base_ckpt.get_array(name, widen=True), dtype=np.float32))
        extra = None
        if entry["extra_rows"]:
            extra = torch.from_numpy(np.array(expert.stored(f"{name}.extra_rows"), dtype=np.float32))
        bias = None if getattr(linear, "bias", None) is None else linear.bias.detach().clone()
        replacement = DeltaLinear(base_weight, expert, name, extra, bias)
        parent_path, _, child = path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, child, replacement)
    return model.eval(), tokenizer


__all__ = ["DeltaLinear", "load_fused_model"]
