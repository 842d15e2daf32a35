"""The output-aware score of the budget planner (meswitch.sensitivity) on the bundled family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meswitch.calibration import read_calibration_texts
from meswitch.family import family_dir
from meswitch.sensitivity import MatrixSensitivity, output_sensitivity


def test_score_is_the_kronecker_factored_quadratic_form():
    rng = np.random.default_rng(0)
    error = rng.standard_normal((5, 4))
    g = rng.random(7)  # more rows than the error: an expanded vocabulary's rows have none
    x = rng.standard_normal((50, 4))
    h = x.T @ x / 50
    expected = sum(g[r] * error[r] @ h @ error[r] for r in range(5))
    assert MatrixSensitivity(g, h).score(error) == pytest.approx(expected, rel=1e-12)
    diagonal = rng.random(4)
    assert MatrixSensitivity(g, diagonal).score(error) == pytest.approx(
        sum(g[r] * (diagonal * error[r] ** 2).sum() for r in range(5)), rel=1e-12)


def test_output_sensitivity_of_the_math_expert():
    torch.set_num_threads(2)
    expert = family_dir() / "math"
    texts = read_calibration_texts(family_dir().parent / "calib" / "math.jsonl")[:4]
    sensitivity = output_sensitivity(expert, texts)
    names = {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.5.mlp.down_proj.weight"}
    assert names <= set(sensitivity)
    for name in names:
        s = sensitivity[name]
        assert np.isfinite(s.row_weight).all() and (s.row_weight >= 0).all() and s.row_weight.sum() > 0, name
    head, embedding = sensitivity["lm_head.weight"], sensitivity["model.embed_tokens.weight"]
    assert head.row_weight.shape == embedding.row_weight.shape  # one per vocabulary entry
    assert head.column_form.shape == (256, 256) and embedding.column_form.shape == (256,)
    assert (embedding.row_weight > 0).all()  # unseen tokens are floored, not free
    assert sensitivity["model.layers.0.self_attn.q_proj.weight"].score(np.zeros((256, 256))) == 0.0
