"""Delta-compression baselines measured beside meswitch.

* RTN: the same quantizer with no salient channels and no step-size search
  (``CompressionSettings(salient=0, clip_grid=1)``), so it goes through the normal
  artifact path.
* BitDelta: ``sign(delta) * mean(|delta|)`` with one scale per matrix (1 bit per
  parameter plus one f16 scale), built here as dense weights for evaluation; and, as
  the BitDelta paper does it, with the per-matrix scales then distilled on calibration
  text: trained with Adam to minimise the mean squared error between the compressed
  and the FP16 expert's logits, or their KL divergence (:func:`bitdelta_distilled_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

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


def bitdelta_distilled_weights(base: str | os.PathLike[str], expert: str | os.PathLike[str], texts: Sequence[str], *,
                               steps: int = 200, lr: float = 1e-2, batch_size: int = 4, max_length: int = 128,
                               seed: int = 0, objective: str = "logit_mse") -> dict[str, np.ndarray]:
    """BitDelta weights with the per-matrix scales distilled on ``texts``.

    Each delta matrix is ``base + alpha * sign(delta)``; every ``alpha`` starts at
    ``mean(|delta|)`` and is trained through a multiplier (so one learning rate suits
    scales of any size) with Adam for ``steps`` steps of ``batch_size`` random texts
    (truncated to ``max_length`` tokens), minimising the distance between the logits and
    the FP16 expert's: ``objective="logit_mse"``, the mean squared error, as the BitDelta
    paper does, or ``"kl"``, the KL divergence of the next-token distributions (what
    ``meswitch.refine`` minimises; on the bundled family it is the stronger baseline).
    The scales are rounded to f16 at the end, as stored.
    """
    if objective not in ("logit_mse", "kl"):
        raise ValueError(f"objective must be 'logit_mse' or 'kl', got {objective!r}")
    import torch
    from torch.func import functional_call

    from meswitch.artifact import model_from_weights
    from meswitch.calibration import token_sequences
    from meswitch.evaluation import load_model

    weights = dict(bitdelta_weights(base, expert))
    teacher, tokenizer = load_model(expert)
    student, _ = model_from_weights(expert, weights)
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    parameters = dict(student.named_parameters())
    base_ckpt, expert_ckpt = open_checkpoint(base), open_checkpoint(expert)
    matrices = {}
    for name in expert_ckpt:
        if name in parameters and name in base_ckpt and is_delta_role(tensor_role(name)) \
                and len(expert_ckpt.info(name)["shape"]) == 2:
            base_rows = torch.from_numpy(np.array(base_ckpt.get_array(name, widen=True), dtype=np.float32))
            rows = base_rows.shape[0]
            delta = torch.from_numpy(np.array(expert_ckpt.get_array(name, widen=True), dtype=np.float32))[:rows] \
                - base_rows
            scale = float(np.float16(delta.abs().mean()))
            matrices[name] = {"base": base_rows, "sign": torch.where(delta >= 0, 1.0, -1.0), "scale": scale,
                              "extra": parameters[name].detach()[rows:].clone(),
                              "multiplier": torch.ones((), requires_grad=True)}

    def dense() -> dict[str, torch.Tensor]:
        return {name: torch.cat([m["base"] + m["scale"] * m["multiplier"] * m["sign"], m["extra"]], dim=0)
                for name, m in matrices.items()}

    def distance(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if objective == "logit_mse":
            return torch.mean((logits - target) ** 2)
        return torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(target, -1),
                                          log_target=True, reduction="batchmean")

    sequences = token_sequences(tokenizer, texts, max_length, "BitDelta distillation")
    with torch.no_grad():
        targets = [teacher(input_ids=ids[None]).logits[0].float() for ids in sequences]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([m["multiplier"] for m in matrices.values()], lr=lr)
    for _ in range(steps):
        picks = torch.randint(len(sequences), (min(batch_size, len(sequences)),), generator=generator)
        current = dense()
        loss = sum(distance(functional_call(student, current, args=(), kwargs={"input_ids": sequences[int(i)][None]})
                            .logits[0].float(), targets[int(i)]) for i in picks) / len(picks)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, m in matrices.items():
            scale = np.float32(np.float16(m["scale"] * float(m["multiplier"])))  # the stored f16 scale
            weights[name] = np.concatenate([(m["base"] + float(scale) * m["sign"]).numpy(), m["extra"].numpy()], axis=0)
    return weights
