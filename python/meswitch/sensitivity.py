"""How much each delta matrix's quantization error moves the expert's output.

The budget planner compares candidates across matrices, so their errors must be in one
unit. A weight-space error (relative to each delta's own energy) cannot see that an
error in ``lm_head`` lands directly on the logits while the same relative error in an
early projection is damped on its way there. Here the unit is the calibration loss.

For a linear ``y = W x`` with a weight error ``E``, the second-order change of the
negative log-likelihood on calibration text is ``E_tokens[(g^T E x)^2] / 2`` with ``g``
the loss gradient at ``y`` (empirical Fisher). Taking ``g`` and ``x`` independent and
``g``'s channels uncorrelated (the Kronecker-factored Fisher),

    score(E) = sum_r G[r] * e_r^T H e_r,   G[r] = E[g_r^2],  H = E[x x^T]

with ``e_r`` row ``r`` of ``E``: the layer's output error through ``H`` (what GPTQ
minimises), weighted per output channel by how much the loss cares about it. An
embedding row ``r`` is read only where token ``r`` occurs, and the error of that row
lands on the embedding output, so its score is ``sum_r f[r] * sum_c G_emb[c] e_rc^2``
with ``f`` the token frequencies (floored: tokens absent from the calibration text
still occur elsewhere) and ``G_emb`` the per-channel gradient second moment there.

Cost: one forward and backward pass per calibration text through the float32 expert
(the same model ``meswitch.refine`` holds), plus one ``[rows, cols] x [cols, cols]``
product per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class MatrixSensitivity:
    """The quadratic form that scores one delta matrix's error ``E [rows, cols]``.

    Attributes
    ----------
    row_weight
        ``[rows]``: ``E[g_r^2]`` of the linear's output channel ``r``, or the frequency of
        token ``r`` for an embedding.
    column_form
        ``[cols, cols]`` (``E[x x^T]`` of a linear's input) or ``[cols]`` (a diagonal:
        ``E[g_c^2]`` at an embedding's output).
    """

    row_weight: np.ndarray
    column_form: np.ndarray

    def score(self, error: np.ndarray) -> float:
        """``sum_r row_weight[r] * e_r^T column_form e_r`` in float64.

        ``error`` may have fewer rows than ``row_weight`` (an expanded vocabulary's new
        rows are stored whole and have no error).
        """
        error = np.asarray(error, dtype=np.float64)
        form = np.asarray(self.column_form, dtype=np.float64)
        through = error @ form if form.ndim == 2 else error * form
        row_weight = self.row_weight[: error.shape[0]].astype(np.float64)
        return float(np.einsum("r,rc,rc->", row_weight, through, error))


def output_sensitivity(expert: str | Path, texts: Sequence[str], hessians: dict[str, np.ndarray] | None = None,
                       max_length: int = 256, max_tokens: int = 16384) -> dict[str, MatrixSensitivity]:
    """``{weight name: MatrixSensitivity}`` for every linear and embedding of ``expert`` on ``texts``.

    Parameters
    ----------
    expert
        The FP16 expert's checkpoint directory (run in float32).
    texts
        Calibration texts, tokenised one by one and truncated to ``max_length``.
    hessians
        ``E[x x^T]`` per linear when already collected (``collect_input_hessians``);
        collected here otherwise.
    max_tokens
        Stop after this many tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meswitch.calibration import calibration_ids, collect_input_hessians

    tokenizer = AutoTokenizer.from_pretrained(expert)
    model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)
    if hessians is None:
        hessians = collect_input_hessians(model, tokenizer, texts, max_length=max_length, max_tokens=max_tokens)
    gradient_squares: dict[str, torch.Tensor] = {}
    token_counts: dict[str, torch.Tensor] = {}
    embeddings: dict[str, torch.nn.Embedding] = {}
    handles = []

    def output_hook(name: str):
        def accumulate(grad):
            g = grad.detach().reshape(-1, grad.shape[-1]).double()
            squares = (g * g).sum(dim=0)
            gradient_squares[name] = squares if name not in gradient_squares else gradient_squares[name] + squares

        def hook(_module, _inputs, output):  # the gradient at the module's output, when backward reaches it
            output.register_hook(accumulate)
        return hook

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            handles.append(module.register_forward_hook(output_hook(module_name + ".weight")))
            if isinstance(module, torch.nn.Embedding):
                embeddings[module_name + ".weight"] = module
    model.eval()
    seen = 0
    try:
        for ids in calibration_ids(tokenizer, texts, max_length, max_tokens):
            if ids.shape[1] < 2:
                continue
            for name, module in embeddings.items():
                counts = torch.bincount(ids.reshape(-1), minlength=module.num_embeddings).double()
                token_counts[name] = counts if name not in token_counts else token_counts[name] + counts
            model.zero_grad(set_to_none=True)
            # Summed, not averaged, over tokens: every token's gradient counts once.
            loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)
            loss.backward()
            seen += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    result: dict[str, MatrixSensitivity] = {}
    for name, squares in gradient_squares.items():
        g = (squares / max(seen, 1)).numpy()
        if name in embeddings:
            frequency = (token_counts[name] / max(seen, 1)).numpy()
            frequency = np.maximum(frequency, max(float(frequency[frequency > 0].min(initial=1.0)) * 0.5, 1e-12))
            # With the Fisher at the embedding output among the Hessians (what GPTQ quantizes the
            # embedding against), its whole matrix; its diagonal is ``g``.
            result[name] = MatrixSensitivity(frequency, hessians.get(name, g))
        elif name in hessians:
            result[name] = MatrixSensitivity(g, hessians[name])
    return result
