"""The bundled family runs with compressed experts on CPU without decompressing: the
fused-kernel model's logits match the decompressed model's."""

from __future__ import annotations

import pytest
import torch

import numpy as np

from meswitch.artifact import load_artifact, load_compressed_model, model_from_weights
from meswitch import ops
from meswitch.checkpoint import open_checkpoint
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.fused import DeltaLinear, load_fused_model

TEXTS = {
    "chat": "<|user|>do you like hiking in the mountains?<|end|>\n<|assistant|>",
    "math": "Tara has 12 shells. Tara finds 9 more shells. How many shells does Tara have now?\n",
    "code": "def read_config(path):\n    with open(path) as handle:\n",
}


@pytest.mark.parametrize("domain", ["chat", "math", "code"])
def test_fused_logits_match_the_decompressed_model(tmp_path, domain):
    family = family_dir()
    out = tmp_path / f"{domain}.meswitch"
    compress(family / "base", family / domain, out, progress=False,
             settings=CompressionSettings(bits=2, salient=0.01, ragged_groups=True))
    fused, tokenizer = load_fused_model(family / "base", out)
    # The decompressed model, as `meswitch decompress` writes it: weights rounded to the expert's f16.
    dense, _ = load_compressed_model(family / "base", out)
    # The same reconstruction kept in float32 (base + dequantized delta), what the kernel computes.
    artifact, base = load_artifact(out), open_checkpoint(family / "base")
    exact = {}
    for name, array in artifact.weights(family / "base"):
        entry = artifact.tensors[name]
        if entry["kind"] == "delta":
            rows = entry["rows"]
            array = np.array(array, dtype=np.float32)
            array[:rows] = base.get_array(name, widen=True) + artifact.delta(name)
        exact[name] = array
    reference, _ = model_from_weights(out / "expert", exact)
    replaced = [m for m in fused.modules() if isinstance(m, DeltaLinear)]
    assert len(replaced) == 6 * 7 + 1  # every attention/MLP projection and lm_head
    ids = tokenizer(TEXTS[domain], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fused_logits = fused(input_ids=ids).logits
        dense_logits = dense(input_ids=ids).logits
        exact_logits = reference(input_ids=ids).logits
    assert fused_logits.shape == dense_logits.shape
    scale = exact_logits.abs().max().item()
    # Against the float32 reconstruction: the same math in another order (base and delta
    # products summed separately, the kernel's per-group s * (sum code*x - z * sum x)),
    # through 6 layers: measured 3-5e-5 of the largest logit, the same on the float32 AVX-512
    # kernel and on the VNNI kernel (x as two int8 digits); bound 1e-4.
    assert (fused_logits - exact_logits).abs().max().item() <= 1e-4 * scale
    # Against the decompressed f16 checkpoint: f16 weight rounding (2^-11 relative) adds
    # up to about 1e-4 of the largest logit here; 1e-3 is the stated bound.
    assert (fused_logits - dense_logits).abs().max().item() <= 1e-3 * scale
    assert (fused_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.parametrize("path", ["avx512vnni", "avx2int"])
def test_fused_logits_with_int8_activations(tmp_path, monkeypatch, force_cpu_path, path):
    """MESWITCH_ACTIVATION_DIGITS=1 (x as one int8 digit per value on an integer path):
    measured about 2e-3 of the largest logit on the bundled family; bound 1e-2. Skipped
    where the CPU lacks the path (elsewhere the float kernels would run instead)."""
    force_cpu_path(path)
    monkeypatch.setenv("MESWITCH_ACTIVATION_DIGITS", "1")
    family = family_dir()
    out = tmp_path / "math.meswitch"
    compress(family / "base", family / "math", out, progress=False,
             settings=CompressionSettings(bits=2, salient=0.01, ragged_groups=True))
    fused, tokenizer = load_fused_model(family / "base", out)
    dense, _ = load_compressed_model(family / "base", out)
    ids = tokenizer(TEXTS["math"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fused_logits = fused(input_ids=ids).logits
        dense_logits = dense(input_ids=ids).logits
    assert ops.cpu_kernel_path() == path
    scale = dense_logits.abs().max().item()
    difference = (fused_logits - dense_logits).abs().max().item()
    assert difference <= 1e-2 * scale
    # The int8 rounding shows: on this prompt the float kernels differ from the decompressed
    # model by 1.3e-4 of the largest logit (f16 weight rounding), the one-digit kernel by
    # 1.7e-3; more than 5e-4 means the one-digit kernel is the one that ran.
    assert difference > 5e-4 * scale, difference / scale
    assert (fused_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item() >= 0.95
