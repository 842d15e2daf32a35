"""The error-compensating quantizer (C++ GPTQ) against an independent NumPy reference.

The reference is the method as specified in include/meswitch/gptq.hpp, written the plain
way: H^-1 by ``numpy.linalg.inv``, its upper Cholesky factor by ``numpy.linalg.cholesky``,
and the columns quantized one at a time with the whole remaining matrix updated after
each (no lazy blocks, no row chunks, no reversed factorization). Group scales and zero
points are round-to-nearest's, from the NumPy reference of test_quantize_reference.py.
On the real layers of the bundled family the layer output error ``||X D^T - X D_hat^T||``
(through H) is checked against round-to-nearest's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from meswitch import _core
from test_quantize_reference import F32, ref_dequantize, ref_pack, ref_quantize

QUANT_PIECES = [piece for piece, _ in _core.DELTA_PIECES]


def ref_gptq(delta: np.ndarray, hessian: np.ndarray, salient_idx: np.ndarray, bits: int, group_size: int,
             damping: float = 0.01, act_order: bool = False) -> dict[str, np.ndarray]:
    rows, cols = delta.shape
    group = min(group_size or cols, cols)
    rtn = ref_quantize(delta, None, salient_idx, bits, group_size, clip_grid=1)  # static groups: RTN's
    scales, zeros = rtn["scales"].astype(F32), rtn["zeros"].astype(F32)
    salient = {int(i) for i in salient_idx}
    kept = [c for c in range(cols) if c not in salient]
    if act_order:
        kept.sort(key=lambda c: -hessian[c, c])  # stable: ties keep the natural order
    order = kept + sorted(salient)
    h = hessian[np.ix_(order, order)].astype(np.float64)
    diagonal = np.diag(h).copy()
    diagonal[diagonal == 0] = 1.0
    np.fill_diagonal(h, diagonal + damping * diagonal.mean())
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    levels = F32(2**bits - 1)
    work = delta[:, order].astype(np.float64)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    salient_values = np.zeros((rows, len(salient)), dtype=np.float16)
    slots = {c: i for i, c in enumerate(sorted(salient))}
    for p, column in enumerate(order):
        value = work[:, p].astype(F32)
        if column in slots:
            salient_values[:, slots[column]] = value.astype(np.float16)
            approx = value.astype(np.float16).astype(F32)
        else:
            g = column // group
            code = np.clip(np.rint(value / scales[:, g]) + zeros[:, g], F32(0), levels)
            codes[:, column] = code.astype(np.uint8)
            approx = (code - zeros[:, g]) * scales[:, g]
        error = (work[:, p] - approx.astype(np.float64)) / upper[p, p]
        work[:, p + 1:] -= np.outer(error, upper[p, p + 1:])
    for column in salient:
        codes[:, column] = rtn["zeros"][:, column // group]
    return {"codes": codes, "qweight": ref_pack(codes, bits), "scales": rtn["scales"], "zeros": rtn["zeros"],
            "salient_idx": np.array(sorted(salient), dtype=np.int32), "salient": salient_values}


def correlated_hessian(rng: np.random.Generator, cols: int) -> np.ndarray:
    mixing = np.eye(cols) + 0.3 * rng.standard_normal((cols, cols))
    x = rng.standard_normal((4 * cols, cols)) @ mixing
    x[:, ::5] *= 4.0  # a few loud channels
    x[:, 3] = 0.0  # a channel never active
    return (x.T @ x / x.shape[0]).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("group_size", [0, 16, 24])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_reference(bits, group_size, act_order):
    rng = np.random.default_rng(bits * 100 + group_size + act_order)
    rows, cols = 40, 72  # groups of 24 divide 72; 16 leaves a ragged last group of 8
    delta = (0.01 * rng.standard_normal((rows, cols))).astype(np.float32)
    hessian = correlated_hessian(rng, cols)
    salient_idx = np.array([50, 2, 17], dtype=np.int32)
    ours = _core.quantize_delta_gptq(delta, hessian, salient_idx, bits, group_size, 1, 0.5, "w", True, 0.01,
                                     act_order)
    expected = ref_gptq(delta, hessian, salient_idx, bits, group_size, act_order=act_order)
    for piece in QUANT_PIECES:
        np.testing.assert_array_equal(np.asarray(ours[piece]), expected[piece], err_msg=piece)


def layer_errors(delta, hessian, bits, group_size, k, act_order=False):
    """(RTN, GPTQ) layer output errors through H with the same salient channels."""
    weight = np.ascontiguousarray(np.diagonal(hessian), dtype=np.float32)
    scores = _core.channel_error_scores(delta, weight, bits, group_size)
    salient_idx = np.asarray(_core.select_salient_channels(scores, k), dtype=np.int32)
    errors = []
    for pieces in (_core.quantize_delta(delta, weight, salient_idx, bits, group_size),
                   _core.quantize_delta_gptq(delta, hessian, salient_idx, bits, group_size, act_order=act_order)):
        stored = [np.asarray(pieces[p]) for p in QUANT_PIECES]
        errors.append(_core.hessian_weighted_error(*stored, *delta.shape, bits, pieces["group_size"], delta,
                                                   hessian)[0])
    return errors


def test_output_error_through_h_is_exact():
    rng = np.random.default_rng(7)
    delta = (0.01 * rng.standard_normal((30, 48))).astype(np.float32)
    hessian = correlated_hessian(rng, 48)
    pieces = _core.quantize_delta_gptq(delta, hessian, np.zeros(0, np.int32), 2, 16)
    stored = [np.asarray(pieces[p]) for p in QUANT_PIECES]
    error, reference = _core.hessian_weighted_error(*stored, 30, 48, 2, 16, delta, hessian)
    dense = ref_dequantize(np.asarray(_core.unpack_codes(pieces["qweight"], 30, 48, 2)), pieces["scales"],
                           pieces["zeros"], pieces["salient_idx"], pieces["salient"], 16)
    difference = delta.astype(np.float64) - dense
    assert error == pytest.approx(np.einsum("ri,ij,rj->", difference, hessian.astype(np.float64), difference),
                                  rel=1e-9)
    assert reference == pytest.approx(np.einsum("ri,ij,rj->", delta.astype(np.float64),
                                                hessian.astype(np.float64), delta.astype(np.float64)), rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gptq_beats_rtn_on_random_layers(bits):
    rng = np.random.default_rng(bits)
    for _ in range(3):
        delta = (0.01 * rng.standard_normal((64, 96))).astype(np.float32)
        rtn, gptq = layer_errors(delta, correlated_hessian(rng, 96), bits, 32, 1)
        assert gptq < rtn


@pytest.fixture(scope="module")
def family_layers():
    """Deltas and calibration Hessians of a few real matrices of the bundled chat expert."""
    import torch
    from meswitch.calibration import collect_input_hessians, read_calibration_texts
    from meswitch.checkpoint import open_checkpoint
    from meswitch.family import family_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = family_dir()
    texts = read_calibration_texts(family.parent / "calib" / "chat.jsonl", limit=16)
    model = AutoModelForCausalLM.from_pretrained(family / "chat", dtype=torch.float32)
    hessians = collect_input_hessians(model, AutoTokenizer.from_pretrained(family / "chat"), texts)
    base, expert = open_checkpoint(family / "base"), open_checkpoint(family / "chat")
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight",
             "model.layers.5.mlp.up_proj.weight", "lm_head.weight"]
    layers = {}
    for name in names:
        base_rows = base.get_array(name, widen=True)
        delta = (expert.get_array(name, widen=True)[: base_rows.shape[0]] - base_rows).astype(np.float32)
        layers[name] = (np.ascontiguousarray(delta), hessians[name])
    # Linears that read one input share one Hessian array.
    assert hessians["model.layers.0.self_attn.k_proj.weight"] is hessians["model.layers.0.self_attn.q_proj.weight"]
    assert hessians["model.layers.0.mlp.gate_proj.weight"] is hessians["model.layers.0.mlp.up_proj.weight"]
    return layers


def test_streamed_hessians_equal_the_whole_model_capture(tmp_path):
    """Layer by layer with each Hessian spilled to disk: the same values as one hooked forward, bit for bit."""
    import torch
    from meswitch.calibration import collect_input_hessians, read_calibration_texts, stream_input_hessians
    from meswitch.family import family_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = family_dir()
    texts = read_calibration_texts(family.parent / "calib" / "math.jsonl", limit=12)
    model = AutoModelForCausalLM.from_pretrained(family / "math", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(family / "math")
    whole = collect_input_hessians(model, tokenizer, texts, max_tokens=1500)
    streamed = stream_input_hessians(model, tokenizer, texts, tmp_path / "h", max_tokens=1500)
    assert set(streamed) == set(whole) and "lm_head.weight" in streamed
    for name in whole:
        array = streamed[name]
        assert isinstance(array, np.memmap) and array.dtype == np.float32
        np.testing.assert_array_equal(array, whole[name], err_msg=name)
    # One file per distinct input: q/k/v share the attention input, gate/up the MLP input.
    layers = model.config.num_hidden_layers
    assert len(list((tmp_path / "h").iterdir())) == 4 * layers + 1
    assert streamed.nbytes() == sum(4 * h.size + 128 for h in {id(h): h for h in whole.values()}.values())
    streamed.close()
    assert not (tmp_path / "h").exists()


def test_embedding_fisher_matches_the_gradients_at_the_embedding_output():
    """The embedding's GPTQ Hessian E[g g^T]: its diagonal equals the planner's E[g_c^2] at the embedding
    output, which meswitch.sensitivity takes by another route (weight gradients on, output hooks)."""
    import torch
    from meswitch.calibration import embedding_output_fisher, read_calibration_texts
    from meswitch.family import family_dir
    from meswitch.sensitivity import output_sensitivity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = family_dir()
    texts = read_calibration_texts(family.parent / "calib" / "code.jsonl", limit=6)
    model = AutoModelForCausalLM.from_pretrained(family / "code", dtype=torch.float32)
    fisher = embedding_output_fisher(model, AutoTokenizer.from_pretrained(family / "code"), texts)
    assert list(fisher) == ["model.embed_tokens.weight"]
    f = fisher["model.embed_tokens.weight"]
    assert f.shape == (model.config.hidden_size,) * 2 and np.allclose(f, f.T)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # left as found
    reference = output_sensitivity(family / "code", texts, hessians={})["model.embed_tokens.weight"].column_form
    np.testing.assert_allclose(np.diagonal(f), reference, rtol=2e-4, atol=1e-12)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the lookup's Fisher does not see the logits
    assert embedding_output_fisher(model, AutoTokenizer.from_pretrained(family / "code"), texts) == {}


def test_gptq_quantizes_the_embedding_against_its_fisher(tmp_path):
    """With calibration text the embedding is stored by GPTQ, and its Fisher-weighted error is below RTN's."""
    import safetensors.numpy
    import torch
    from meswitch.calibration import embedding_output_fisher, read_calibration_texts
    from meswitch.checkpoint import open_checkpoint
    from meswitch.compress import CompressionSettings, compress
    from meswitch.family import family_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = family_dir()
    texts = read_calibration_texts(family.parent / "calib" / "chat.jsonl", limit=8)
    name = "model.embed_tokens.weight"
    reports = {method: compress(family / "base", family / "chat", tmp_path / f"{method}.meswitch", calibration=texts,
                                settings=CompressionSettings(bits=2, ragged_groups=True, method=method),
                                progress=False) for method in ("gptq", "rtn")}
    assert reports["gptq"].tensors[name]["method"] == "gptq" and reports["rtn"].tensors[name]["method"] == "rtn"
    model = AutoModelForCausalLM.from_pretrained(family / "chat", dtype=torch.float32)
    fisher = embedding_output_fisher(model, AutoTokenizer.from_pretrained(family / "chat"), texts)[name]
    base = open_checkpoint(family / "base").get_array(name, widen=True)
    delta = (open_checkpoint(family / "chat").get_array(name, widen=True)[: base.shape[0]] - base).astype(np.float32)
    entry = reports["gptq"].tensors[name]
    errors = {}
    for method in reports:
        artifact = tmp_path / f"{method}.meswitch"
        stored = {}  # read with the reference safetensors package
        for shard in json.loads((artifact / "manifest.json").read_text())["shards"]:
            stored.update(safetensors.numpy.load_file(str(artifact / shard["file"])))
        pieces = [stored[f"{name}.{piece}"] for piece, _ in _core.DELTA_PIECES]
        errors[method] = _core.hessian_weighted_error(*pieces, entry["rows"], entry["cols"], entry["bits"],
                                                      entry["group_size"], np.ascontiguousarray(delta), fisher)[0]
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_compress_leaves_no_spilled_hessians(tmp_path):
    """GPTQ with calibration text spills Hessians beside the output; they go on success and on failure."""
    from meswitch.compress import CompressionSettings, compress
    from meswitch.family import family_dir

    family = family_dir()
    calibration = ["def add(a, b):\n    return a + b\n"] * 4
    compress(family / "base", family / "code", tmp_path / "code.meswitch", calibration=calibration,
             settings=CompressionSettings(bits=2, ragged_groups=True), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.meswitch"]
    def interrupt(done, total, tensor):  # fails after the capture, while tensors are written
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(family / "base", family / "code", tmp_path / "stopped.meswitch", calibration=calibration,
                 settings=CompressionSettings(bits=2, ragged_groups=True), progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.meswitch"]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gptq_beats_rtn_on_real_layers(family_layers, bits):
    for name, (delta, hessian) in family_layers.items():
        k = _core.salient_count(0.01, None, delta.shape[1])
        rtn, gptq = layer_errors(delta, hessian, bits, 64, k)
        assert gptq < rtn, f"{name}: GPTQ {gptq:.4g} vs RTN {rtn:.4g}"


def test_hessian_shape_is_checked():
    delta = np.zeros((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=r"tensor 'w'.*hessian must have shape \(8, 8\)"):
        _core.quantize_delta_gptq(delta, np.eye(6, dtype=np.float32), np.zeros(0, np.int32), 2, 0, name="w")
