"""The capacity planner against real artifacts: its byte count of one expert is the stored
tensor bytes of the tiny family's artifacts, exactly; the per-parameter estimate agrees with
the exact count at 7B widths; and ``meswitch plan`` prints, and refuses, as documented."""

from __future__ import annotations

import json
import math

import pytest
from meswitch.checkpoint import open_checkpoint
from meswitch.compress import CompressionSettings, compress
from meswitch.family import family_dir
from meswitch.store.capacity import ExpertFormat, decoder_tensor_shapes, plan_capacity

# A Mistral-7B-shaped config (its published sizes), for the estimate at real widths.
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False}


def _stored_tensor_bytes(artifact) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text())
    total = 0
    for shard in manifest["shards"]:
        checkpoint = open_checkpoint(artifact / shard["file"])
        total += sum(checkpoint.info(name)["nbytes"] for name in checkpoint)
    return total


def test_shapes_from_config_are_the_checkpoint_shapes():
    base = family_dir() / "base"
    checkpoint = open_checkpoint(base)
    expected = {name: tuple(checkpoint.info(name)["shape"]) for name in checkpoint}
    assert decoder_tensor_shapes(json.loads((base / "config.json").read_text())) == expected


@pytest.mark.parametrize("expert, settings", [
    ("math", CompressionSettings()),
    ("code", CompressionSettings(bits=3, salient_channels=8, vocab_bits=4, group_size=128)),
])
def test_expert_bytes_equal_the_real_artifact(tmp_path, expert, settings):
    family = family_dir()
    artifact = tmp_path / f"{expert}.meswitch"
    compress(family / "base", family / expert, artifact, progress=False, settings=settings)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert {entry["kind"] for entry in manifest["tensors"].values()} == {"delta", "full"}  # a full fine-tune
    expert_format = ExpertFormat(bits=settings.bits, group_size=settings.group_size, salient=settings.salient,
                                 salient_channels=settings.salient_channels, vocab_bits=settings.vocab_bits)
    plan = plan_capacity(1 << 30, expert_format, base=family / "base", kv_cache_bytes=8 << 20)
    assert plan.expert_bytes == _stored_tensor_bytes(artifact)
    assert plan.experts == (plan.free_for_experts // plan.expert_bytes)
    assert plan.free_for_experts == (1 << 30) - plan.base_bytes - (8 << 20)
    assert plan.kv_bytes_per_token == 2 * 6 * 2 * 64 * 2  # layers, kv heads, head_dim, f16


def test_per_parameter_estimate_matches_exact_at_7b_widths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    expert_format = ExpertFormat(bits=2, salient=0.01)
    exact = plan_capacity(80 * 10**9, expert_format, base=tmp_path, kv_cache_bytes=16 * 10**9)
    estimate = plan_capacity(80 * 10**9, expert_format, base_parameters=exact.base_parameters,
                             kv_cache_bytes=16 * 10**9)
    assert exact.base_parameters == 7_241_732_096  # Mistral-7B's parameter count
    assert estimate.expert_bytes == pytest.approx(exact.expert_bytes, rel=0.01)
    assert exact.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    # 2 bits + 24 bits of scale and zero per 64 columns + 1 % of columns in 16 bits
    assert estimate.expert_bits_per_parameter == pytest.approx(2 + 24 / 64 + 0.16)


def test_plan_command(run_cli):
    done = run_cli(["plan", "--base-params", "7e9", "--bits", "2", "--salient", "1%", "--gpu-mem", "80GB",
                    "--kv-budget", "16GB", "--reserve", "2GB", "--json"])
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    expert = math.ceil(7e9 * (2 / 8 + 3 / 64 + 2 * 0.01))
    assert plan["expert_bytes"] == expert
    assert plan["experts"] == (80 * 10**9 - 14 * 10**9 - 18 * 10**9) // expert
    text = run_cli(["plan", "--base", str(family_dir() / "base"), "--gpu-mem", "1GB"])
    assert text.returncode == 0 and "experts fit" in text.stdout and "bytes per token" in text.stdout


@pytest.mark.parametrize("argv, status, message", [
    (["plan", "--gpu-mem", "80GB"], 2, "one of the arguments --base --base-params is required"),
    (["plan", "--base-params", "7e9", "--base", ".", "--gpu-mem", "80GB"], 2, "not allowed with"),
    (["plan", "--base-params", "7e9", "--gpu-mem", "10GB"], 1, "take more than the 10.00 GB"),
    (["plan", "--base-params", "7e9", "--gpu-mem", "80GB", "--kv-budget", "lots"], 2, "--kv-budget"),
    (["plan", "--base-params", "7e9", "--gpu-mem", "80GB", "--bits", "5"], 2, "--bits"),
])
def test_plan_errors(run_cli, argv, status, message):
    done = run_cli(argv)
    assert done.returncode == status
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
