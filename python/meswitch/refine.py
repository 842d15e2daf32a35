"""Learnable step sizes: refine the scales of a compressed expert end to end.

The quantizer picks each group's scale to fit the delta matrix by matrix. What matters
is the expert's output, and on the bundled family matrix-level objectives can even
mislead (docs/results.md: the clipping search lowers its own error yet raises
perplexity). This step keeps every stored code, zero point and salient value and
trains one multiplier per scale group through the whole model. The loss is the KL
divergence from the FP16 expert's next-token distribution on calibration text. Only
``W.scales`` changes in the rewritten artifact.

It holds the base, the expert and the compressed model in float32 memory at once, so
it is meant for models that fit comfortably (the bundled family, or a GPU later).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _scale_groups(artifact, base: str | os.PathLike[str], model_params: dict[str, Any]):
    """Per delta weight: the scale-free part of the dense weight, the stored scales and the rest.

    The dequantization rule lives in C++ (``_core.scale_free_parts``): the dense weight is
    ``base + salient + centred * scales[:, column_group]``, and only that last product,
    through which the multipliers train, is formed here in torch.
    """
    import torch

    from meswitch import _core
    from meswitch.checkpoint import open_checkpoint

    base_ckpt = open_checkpoint(base)
    groups = {}
    for name, entry in artifact.tensors.items():
        if entry["kind"] != "delta" or name not in model_params:
            continue  # a tied weight is trained through the parameter that owns it
        rows, cols = entry["rows"], entry["cols"]
        pieces = [artifact.stored(f"{name}.{piece}") for piece, _ in _core.DELTA_PIECES]
        parts = _core.scale_free_parts(*pieces, rows, cols, entry["bits"], entry["group_size"], name)
        scales = torch.from_numpy(artifact.stored(f"{name}.scales").astype(np.float32))
        base_rows = np.array(base_ckpt.get_array(name, widen=True), dtype=np.float32).reshape(rows, cols)
        fixed = torch.from_numpy(base_rows + parts["salient"])  # the salient values stay as stored
        extra = model_params[name].detach()[rows:].clone()  # an expanded vocabulary's whole rows
        groups[name] = {"centred": torch.from_numpy(parts["centred"]), "scales": scales,
                        "column_group": torch.from_numpy(parts["column_group"]), "fixed": fixed,
                        "extra": extra, "shape": tuple(model_params[name].shape),
                        "multiplier": torch.ones_like(scales, requires_grad=True)}
    return groups


def _dense(group: dict[str, Any]):
    import torch

    scales = group["scales"] * group["multiplier"]
    weight = group["fixed"] + group["centred"] * scales[:, group["column_group"]]
    if group["extra"].shape[0]:
        weight = torch.cat([weight, group["extra"]], dim=0)
    return weight.reshape(group["shape"])


def refine_step_sizes(base: str | os.PathLike[str], expert: str | os.PathLike[str],
                      artifact: str | os.PathLike[str], out: str | os.PathLike[str], texts: Sequence[str], *,
                      steps: int = 300, lr: float = 1e-2, batch_size: int = 8, max_length: int = 256, seed: int = 0,
                      progress: bool = True, force: bool = False,
                      inputs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Train the scales of ``artifact`` end to end and write the result to ``out``.

    Parameters
    ----------
    base, expert
        The base and FP16 expert checkpoint directories the artifact was made from.
    artifact
        The compressed expert to refine (left unchanged).
    out
        The refined artifact, swapped into place in one step (``out`` may equal
        ``artifact``). Another existing artifact there is replaced only with ``force``.
    texts
        Calibration texts (the training split, never evaluation data).
    steps, lr, batch_size, max_length, seed
        Adam steps over random batches of ``batch_size`` texts, each truncated to
        ``max_length`` tokens; ``lr`` applies to the per-group multipliers, which start at 1.
    force, inputs
        Replace an earlier artifact at ``out``; paths (role, path) ``out`` must not be.

    Returns
    -------
    dict
        ``kl_before`` and ``kl_after`` (mean per token, nats, on the calibration texts),
        ``steps``, ``lr``, ``texts`` (calibration texts used) and ``scale_groups``.
    """
    import torch
    from torch.func import functional_call
    from tqdm import tqdm

    from meswitch import _core
    from meswitch.artifact import load_artifact, model_from_weights
    from meswitch.calibration import token_sequences
    from meswitch.evaluation import load_model

    if steps < 1 or lr <= 0:
        raise ValueError(f"refinement needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if not texts:
        raise ValueError("refinement needs calibration texts")
    source = load_artifact(artifact)
    source.check_base(base)
    teacher, tokenizer = load_model(expert)
    model, _ = model_from_weights(source.path / "expert", source.weights(base, check_base=False))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    groups = _scale_groups(source, base, dict(model.named_parameters()))
    sequences = token_sequences(tokenizer, texts, max_length, "refinement")

    def kl_of(batch: Sequence[torch.Tensor], weights) -> torch.Tensor:
        total, count = 0.0, 0
        for ids in batch:
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=ids[None]).logits[0].float(), dim=-1)
            student = torch.log_softmax(functional_call(model, weights, args=(), kwargs={"input_ids": ids[None]})
                                        .logits[0].float(), dim=-1)
            total = total + (target.exp() * (target - student)).sum()
            count += len(ids)
        return total / count

    def current() -> dict[str, torch.Tensor]:
        return {name: _dense(group) for name, group in groups.items()}

    with torch.no_grad():
        kl_before = float(kl_of(sequences, current()))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([g["multiplier"] for g in groups.values()], lr=lr)
    # Cleared on every exit, errors included, so no half-drawn bar precedes an error message.
    with tqdm(range(steps), desc=f"refine {source.name}", disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for _ in bar:
            picks = torch.randint(len(sequences), (min(batch_size, len(sequences)),), generator=generator)
            loss = kl_of([sequences[int(i)] for i in picks], current())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(kl=f"{float(loss.detach()):.4f}")
    refined_scales = {}
    for name, group in groups.items():
        scales = (group["scales"] * group["multiplier"].detach()).numpy()
        refined_scales[name] = _core.f32_to_f16_bits(np.ascontiguousarray(scales, dtype=np.float32))
        group["scales"] = torch.from_numpy(refined_scales[name].view(np.float16).astype(np.float32))
        group["multiplier"] = torch.ones_like(group["scales"])
    with torch.no_grad():
        kl_after = float(kl_of(sequences, current()))  # with the scales as stored (f16)
    summary = {"steps": steps, "lr": lr, "texts": len(sequences), "scale_groups": int(sum(
        g["scales"].numel() for g in groups.values())), "kl_before": kl_before, "kl_after": kl_after}
    in_place = Path(out).resolve() == Path(artifact).resolve()  # refining an artifact in place replaces it
    _rewrite(source, Path(out), refined_scales, summary, force or in_place, list(inputs))
    return summary


def _rewrite(source, out: Path, refined_scales: dict[str, np.ndarray], summary: dict[str, Any], force: bool,
             inputs: list[tuple[str, str]]) -> None:
    """Copy every stored tensor of ``source`` into a new artifact at ``out``, with the refined scales."""
    from meswitch import _core

    manifest = json.loads(json.dumps(source.manifest))
    manifest["quantization"]["refine"] = summary
    # The writer stages beside ``out`` and moves the finished artifact into place, so
    # ``out`` may be the source itself.
    writer = _core.ArtifactWriter(str(out), int(manifest["quantization"].get("max_shard_bytes", 128 << 20)), force,
                                  inputs)
    try:
        for shard in manifest["shards"]:
            for stored in shard["tensors"]:
                weight, _, piece = stored.rpartition(".")
                if piece == "scales" and weight in refined_scales:
                    writer.add_tensor(stored, "F16", refined_scales[weight].view(np.uint16))
                else:
                    array = source.stored(stored)
                    dtype = source.stored_dtype(stored)
                    writer.add_tensor(stored, dtype, np.ascontiguousarray(array.view(np.uint16) if dtype == "BF16"
                                                                           else array))
        for side in source.side_files():
            writer.add_file_content(side, source.read_side_file(side))
        for key in ("shards", "files", "format", "format_version"):
            manifest.pop(key, None)  # the writer records these itself
        writer.commit(json.dumps(manifest))
    except BaseException:
        writer.abort()
        raise
