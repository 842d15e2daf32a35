"""The BitDelta baseline: sign x one f16 scale per delta matrix, and its distilled scales."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import torch
from meswitch.baselines import bitdelta_distilled_weights, bitdelta_storage_bits, bitdelta_weights
from meswitch.calibration import read_calibration_texts, token_sequences
from meswitch.family import family_dir

FAMILY = family_dir()
MATRIX = "model.layers.1.mlp.down_proj.weight"


def _tensors(directory):
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors.numpy.load_file(str(shard)))
    return tensors


def _sign_and_scale(weights: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, float]:
    """The one magnitude of ``weights - base`` (asserting there is one) and its signs."""
    step = (weights[: base.shape[0]] - base).astype(np.float64)
    magnitude = float(np.abs(step).mean())
    np.testing.assert_allclose(np.abs(step), magnitude, rtol=1e-3)
    return np.sign(step), magnitude


def test_bitdelta_is_the_sign_times_the_mean_magnitude_in_f16():
    base, expert = _tensors(FAMILY / "base"), _tensors(FAMILY / "math")
    weights = dict(bitdelta_weights(FAMILY / "base", FAMILY / "math"))
    b, e = base[MATRIX].astype(np.float32), expert[MATRIX].astype(np.float32)
    delta = e - b
    expected = b + np.float32(np.float16(np.abs(delta).mean())) * np.where(delta >= 0, 1.0, -1.0).astype(np.float32)
    np.testing.assert_array_equal(weights[MATRIX], expected)
    norm = "model.layers.1.post_attention_layernorm.weight"  # not a delta matrix: kept exactly
    np.testing.assert_array_equal(weights[norm], expert[norm].astype(np.float32))
    assert bitdelta_storage_bits(688, 256) == 688 * 256 + 16


def _kl_on(weights, texts) -> float:
    from meswitch.artifact import model_from_weights
    from meswitch.evaluation import load_model

    teacher, tokenizer = load_model(FAMILY / "math")
    student, _ = model_from_weights(FAMILY / "math", weights)
    total = 0.0
    with torch.no_grad():
        for ids in token_sequences(tokenizer, texts, 128, "test"):
            p = torch.log_softmax(teacher(input_ids=ids[None]).logits[0].float(), -1)
            q = torch.log_softmax(student(input_ids=ids[None]).logits[0].float(), -1)
            total += float(torch.sum(p.exp() * (p - q)))
    return total


@pytest.mark.parametrize("objective", ["logit_mse", "kl"])
def test_distilled_bitdelta_keeps_signs_and_moves_only_the_scales(objective):
    texts = read_calibration_texts(FAMILY.parent / "calib" / "math.jsonl", limit=8)
    plain = dict(bitdelta_weights(FAMILY / "base", FAMILY / "math"))
    distilled = bitdelta_distilled_weights(FAMILY / "base", FAMILY / "math", texts, steps=15, objective=objective)
    base = _tensors(FAMILY / "base")[MATRIX].astype(np.float32)
    signs, scale = _sign_and_scale(plain[MATRIX], base)
    distilled_signs, distilled_scale = _sign_and_scale(distilled[MATRIX], base)
    np.testing.assert_array_equal(distilled_signs, signs)
    assert distilled_scale != pytest.approx(scale, rel=1e-3)  # trained
    assert np.float16(distilled_scale) == pytest.approx(distilled_scale, rel=1e-3)  # stored as f16
    if objective == "kl":  # the objective it trained on, on the texts it trained on
        assert _kl_on(distilled, texts) < _kl_on(plain, texts)


def test_distillation_objective_is_checked():
    with pytest.raises(ValueError, match="objective must be 'logit_mse' or 'kl'"):
        bitdelta_distilled_weights(FAMILY / "base", FAMILY / "math", ["a b c"], objective="l1")
