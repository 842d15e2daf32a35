"""The multi-expert model on a CUDA device against the same model on the CPU (itself checked against
transformers in test_serve_model.py), and the device tier's budget, eviction and holds. Marked
``cuda``: elsewhere these skip with the reason (conftest.py).

Tolerance: each sequence's logits within 1e-3 of its largest logit, as test_serve_model allows
against transformers. Both hold the bundled base's matrices and the KV cache in its float16;
the GPU differs from the CPU in the order of float32 sums and in the activations rounded to
float16 for the base GEMM (cuBLAS's 16-bit GEMM; the CPU widens the weight instead: 3.5e-4
of a product's scale on random data) and for the delta kernel; the bundled
tiny family's MLP widths (688) are not multiples of 64, so those deltas run dense on the device,
and its attention and output projections run the kernel.
"""

from __future__ import annotations

import pytest
import torch
from meswitch import TierFull
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.serve import MultiExpertModel, SequenceInput
from meswitch.store.device_tier import DeviceTier

pytestmark = pytest.mark.cuda

EXPERTS = ("chat", "math", "code")
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root, source = tmp_path_factory.mktemp("serve_cuda"), family_dir()
    paths = {}
    for name in EXPERTS:
        paths[name] = root / f"{name}.meswitch"
        compress(source / "base", source / name, paths[name], progress=False, settings=CompressionSettings(bits=2))
    return paths


def _batches():
    prompts = {None: [5, 17, 300, 42, 7], "chat": [9, 8, 7, 6, 5, 4, 3], "math": [100, 200, 300], "code": [11, 12]}
    first = [SequenceInput(f"s{i}", expert, tokens) for i, (expert, tokens) in enumerate(prompts.items())]
    steps = [first]
    for step in range(3):  # decode: one token each, a fixed sequence so both devices see the same inputs
        steps.append([SequenceInput(f"s{i}", expert, [50 + step + i]) for i, expert in enumerate(prompts)])
    return steps


def test_the_mixed_batch_on_cuda_matches_the_cpu_model(artifacts):
    base = family_dir() / "base"
    cpu = MultiExpertModel(base, artifacts, kv_cache_bytes=4 << 20)
    gpu = MultiExpertModel(base, artifacts, kv_cache_bytes=4 << 20, device="cuda", device_budget=64 << 20)
    for batch in _batches():
        for want, got in zip(cpu.forward(batch), gpu.forward(batch)):
            assert got.device.type == "cuda"
            scale = float(want.abs().max())
            assert float((got.cpu() - want).abs().max()) <= TOLERANCE * scale
    report = gpu.device_tier.memory_report()
    assert report["entries"] == 3 and report["uploads"] == 3 and report["hits"] == 9  # uploaded once each
    assert all(expert["holders"] == 0 for expert in report["experts"])  # released after every forward


def test_the_device_tier_evicts_the_least_recent_and_refuses_when_all_are_held(artifacts):
    from meswitch.artifact import load_artifact

    opened = {name: load_artifact(path) for name, path in artifacts.items()}
    weights = {name: [w for w, e in a.tensors.items() if e["kind"] == "delta" and "embed" not in w]
               for name, a in opened.items()}
    probe = DeviceTier("cuda", 1 << 40)
    probe.acquire("chat", opened["chat"], weights["chat"])
    one = probe.memory_report()["used_bytes"]
    tier = DeviceTier("cuda", int(one * 1.5))  # room for one expert
    tier.acquire("chat", opened["chat"], weights["chat"])
    with pytest.raises(TierFull, match=r"cannot load expert 'math' .* held, pinned or loading: chat \(\d+ bytes, held\)"):
        tier.acquire("math", opened["math"], weights["math"])
    tier.release("chat")
    tier.acquire("math", opened["math"], weights["math"])  # chat, released, is evicted
    report = tier.memory_report()
    assert [e["name"] for e in report["experts"]] == ["math"] and report["evictions"] == 1
    assert report["used_bytes"] <= report["budget_bytes"]
    with pytest.raises(RuntimeError, match=r"more than the cuda(:0)? tier's whole budget of 1024 bytes"):
        DeviceTier("cuda", 1024).acquire("chat", opened["chat"], weights["chat"])
    with pytest.raises(RuntimeError, match="is held"):
        tier.evict("math")
    tier.release("math")
    tier.evict("math")
    assert tier.memory_report()["entries"] == 0
    assert torch.cuda.is_available()
