"""The compression pipeline end to end on small random Llama pairs built in the test:
artifact round trip, decompress into transformers, base fingerprint, bad input,
atomicity, budget planner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import meswitch
from meswitch.artifact import decompress, load_artifact, load_compressed_model
from meswitch.compress import (CompressionSettings, PlanChoice, compress, compressed_bits, parse_salient,
                               plan_budget, salient_count)


def _config(vocab: int = 96) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)


def _save(model: torch.nn.Module, directory: Path, dtype: torch.dtype, shard: str | None = None) -> Path:
    model.to(dtype).save_pretrained(directory, max_shard_size=shard) if shard else model.to(dtype).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A random base and an expert = base + structured delta (a few strong input channels), f16."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config()).eval()
    _save(base, root / "base", torch.float16)
    expert = transformers.LlamaForCausalLM(_config()).eval()
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, tensor in base.state_dict().items():
        delta = 0.01 * torch.randn(tensor.shape, generator=generator)
        if tensor.ndim == 2:
            delta[:, :2] *= 20  # outlier input channels, what salient selection is for
        state[name] = (tensor.float() + delta)
    expert.load_state_dict(state)
    _save(expert, root / "expert", torch.float16, shard="60KB")  # sharded expert
    return root / "base", root / "expert"


def test_parse_salient_and_counts():
    assert parse_salient("1%") == (pytest.approx(0.01), None)
    assert parse_salient("100%") == (1.0, None)  # every channel, not one
    assert parse_salient("8") == (0.0, 8)
    assert parse_salient("1") == (0.0, 1)
    for bad in ("nan", "inf", "-1", "0.5", "150%", "nan%", "x"):
        with pytest.raises(ValueError):
            parse_salient(bad)
    assert salient_count(0.01, None, 64) == 1
    assert salient_count(0.0, None, 64) == 0
    assert salient_count(1.0, None, 64) == 64
    assert salient_count(0.0, 8, 64) == 8
    assert salient_count(0.0, 1000, 64) == 64
    for fraction, channels in ((float("inf"), None), (float("nan"), None), (1.5, None), (-0.1, None), (0.0, -1)):
        with pytest.raises(ValueError):
            salient_count(fraction, channels, 64)
        with pytest.raises(ValueError):
            CompressionSettings(salient=fraction, salient_channels=channels).validate()
    assert compressed_bits(4, 64, 2, 32, 1) == 4 * 4 * 32 + 4 * 2 * 24 + 4 * 16 + 32


@pytest.mark.parametrize(("salient", "expected"), [("100%", "cols"), ("1", 1), ("0", 0), ("50%", "half")])
def test_cli_salient_percentages_and_counts(pair, tmp_path, salient, expected):
    """'100%' keeps every channel and a bare '1' one channel, through the CLI into the artifact."""
    from meswitch.cli import main

    base, expert = pair
    out = tmp_path / "s.meswitch"
    assert main(["compress", "--base", str(base), "--expert", str(expert), "--salient", salient,
                 "--max-shard-bytes", "1MiB", "--quiet", "--out", str(out)]) == 0
    manifest = load_artifact(out).manifest
    assert manifest["quantization"]["max_shard_bytes"] == 1 << 20
    for entry in manifest["tensors"].values():
        if entry["kind"] == "delta":
            wanted = {"cols": entry["cols"], "half": round(entry["cols"] / 2)}.get(expected, expected)
            assert entry["salient"] == wanted


def test_artifact_round_trip_and_decompress_loads_in_transformers(pair, tmp_path):
    base, expert = pair
    report = compress(base, expert, tmp_path / "e.meswitch", settings=CompressionSettings(bits=2, group_size=32,
                      salient=0.05), progress=False)
    # 2-bit codes + 24 bits of scale/zero per 32 + 5 % salient in f16: about 3.55 bits
    assert report.avg_bits < 3.6 and report.artifact_bytes < report.delta_bytes_fp16 / 3
    artifact = load_artifact(tmp_path / "e.meswitch")
    assert artifact.manifest["format_version"] == 1
    # The shards are plain safetensors files: the reference package reads every tensor.
    for shard in artifact.manifest["shards"]:
        loaded = safetensors.numpy.load_file(str(tmp_path / "e.meswitch" / shard["file"]))
        assert set(loaded) == set(shard["tensors"])
    name = "model.layers.0.mlp.down_proj.weight"
    entry = artifact.tensors[name]
    assert entry["kind"] == "delta" and entry["salient"] == 6 and entry["bits"] == 2
    # Salient channels found: the outlier columns 0 and 1.
    assert {0, 1} <= set(artifact.stored(f"{name}.salient_idx").tolist())

    out = decompress(base, tmp_path / "e.meswitch", tmp_path / "decompressed")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = meswitch.open_checkpoint(base).get_array(name, widen=True) + artifact.delta(name)
    np.testing.assert_array_equal(model.state_dict()[name].numpy(), expected.astype(np.float16).astype(np.float32))
    true_expert = meswitch.open_checkpoint(expert).get_array(name, widen=True)
    true_delta = true_expert - meswitch.open_checkpoint(base).get_array(name, widen=True)
    relative = np.linalg.norm(expected - true_expert) / np.linalg.norm(true_delta)
    assert relative < 0.5, relative  # 2-bit delta keeps the bulk of the fine-tune
    # Non-matrix tensors differ in this expert, so they are stored whole and come back exactly.
    norm = "model.norm.weight"
    assert artifact.tensors[norm]["kind"] == "full"
    np.testing.assert_array_equal(model.state_dict()[norm].numpy(),
                                  meswitch.open_checkpoint(expert).get_array(norm, widen=True))
    # In-memory reconstruction equals the decompressed checkpoint.
    in_memory, _ = load_compressed_model(base, tmp_path / "e.meswitch")
    assert torch.equal(in_memory.state_dict()[name], model.state_dict()[name])


def test_expanded_vocabulary_and_bf16(tmp_path):
    torch.manual_seed(2)
    base = transformers.LlamaForCausalLM(_config(96)).eval()
    _save(base, tmp_path / "base", torch.bfloat16)
    expert = transformers.LlamaForCausalLM(_config(96)).eval()
    expert.load_state_dict({k: v.float() + 0.01 for k, v in base.state_dict().items()})
    expert.resize_token_embeddings(100)
    _save(expert, tmp_path / "expert", torch.bfloat16)
    compress(tmp_path / "base", tmp_path / "expert", tmp_path / "v.meswitch", progress=False)
    artifact = load_artifact(tmp_path / "v.meswitch")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert artifact.tensors[name]["extra_rows"] == 4
        assert artifact.tensors[name]["shape"] == [100, 64]
    out = decompress(tmp_path / "base", tmp_path / "v.meswitch", tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (100, 64)
    assert model.dtype == torch.bfloat16
    expert_rows = meswitch.open_checkpoint(tmp_path / "expert").get_array("lm_head.weight", widen=True)[96:]
    np.testing.assert_array_equal(model.state_dict()["lm_head.weight"][96:].float().numpy(), expert_rows)


def test_ragged_groups_when_allowed(pair, tmp_path):
    base, expert = pair
    report = compress(base, expert, tmp_path / "r.meswitch", progress=False,
                      settings=CompressionSettings(group_size=48, ragged_groups=True))
    entry = report.tensors["model.layers.0.mlp.up_proj.weight"]  # 64 columns: one group of 48, one of 16
    artifact = load_artifact(tmp_path / "r.meswitch")
    assert artifact.stored("model.layers.0.mlp.up_proj.weight.scales").shape == (entry["rows"], 2)
    down = "model.layers.0.mlp.down_proj.weight"  # 128 columns: 48 + 48 + 32
    assert artifact.stored(f"{down}.scales").shape[1] == 3
    true_delta = (meswitch.open_checkpoint(expert).get_array(down, widen=True)
                  - meswitch.open_checkpoint(base).get_array(down, widen=True))
    assert np.linalg.norm(artifact.delta(down) - true_delta) < 0.5 * np.linalg.norm(true_delta)


def test_wrong_base_is_refused(pair, tmp_path):
    base, expert = pair
    compress(base, expert, tmp_path / "e.meswitch", progress=False)
    torch.manual_seed(5)
    other = _save(transformers.LlamaForCausalLM(_config()), tmp_path / "other", torch.float16)
    with pytest.raises(meswitch.FormatError, match="different base model.*tensor '"):
        decompress(other, tmp_path / "e.meswitch", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_corrupted_artifact_is_refused(pair, tmp_path):
    base, expert = pair
    compress(base, expert, tmp_path / "e.meswitch", progress=False)
    shard = next((tmp_path / "e.meswitch").glob("deltas-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(meswitch.FormatError, match="sha256"):
        load_artifact(tmp_path / "e.meswitch")


@pytest.mark.parametrize(("settings", "pattern"), [
    (CompressionSettings(bits=0), "bits"),
    (CompressionSettings(bits=5), "bits"),
    (CompressionSettings(vocab_bits=0), "vocab_bits"),
])
def test_bad_settings(pair, tmp_path, settings, pattern):
    base, expert = pair
    with pytest.raises(ValueError, match=pattern):
        compress(base, expert, tmp_path / "x.meswitch", settings=settings, progress=False)
    assert not list(tmp_path.iterdir())


def test_group_not_dividing_the_width_names_the_tensor(pair, tmp_path):
    base, expert = pair
    with pytest.raises(ValueError, match=r"tensor '[\w.]+\.weight'.*group size 48 does not divide the width 64"):
        compress(base, expert, tmp_path / "x.meswitch", progress=False,
                 settings=CompressionSettings(group_size=48, ragged_groups=False))
    assert not list(tmp_path.iterdir())  # no artifact, no staging directory


def _write_model_files(directory: Path, tensors: dict[str, np.ndarray], like: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text((like / "config.json").read_text())
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _expert_tensors(expert: Path) -> dict[str, np.ndarray]:
    checkpoint = meswitch.open_checkpoint(expert)
    return {name: np.array(checkpoint.get_array(name, widen=True)) for name in checkpoint}


def test_shape_mismatch_names_the_tensor(pair, tmp_path):
    base, expert = pair
    tensors = _expert_tensors(expert)
    tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((64, 32), dtype=np.float32)
    bad = _write_model_files(tmp_path / "bad", tensors, expert)
    with pytest.raises(meswitch.FormatError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight"):
        compress(base, bad, tmp_path / "x.meswitch", progress=False)


def test_missing_tensor_names_the_tensor(pair, tmp_path):
    base, expert = pair
    tensors = _expert_tensors(expert)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    bad = _write_model_files(tmp_path / "bad", tensors, expert)
    with pytest.raises(meswitch.FormatError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*missing"):
        compress(base, bad, tmp_path / "x.meswitch", progress=False)


def test_nan_in_delta_names_the_tensor(pair, tmp_path):
    base, expert = pair
    tensors = _expert_tensors(expert)
    tensors["model.layers.1.mlp.gate_proj.weight"][3, 5] = np.nan
    bad = _write_model_files(tmp_path / "bad", tensors, expert)
    with pytest.raises(meswitch.FormatError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        compress(base, bad, tmp_path / "x.meswitch", progress=False)
    assert not list(p for p in tmp_path.iterdir() if "meswitch" in p.name)


def test_dtype_mismatch_names_the_tensor(pair, tmp_path):
    base, expert = pair
    tensors = _expert_tensors(expert)
    tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((64, 64), dtype=np.int32)
    bad = _write_model_files(tmp_path / "bad", tensors, expert)
    with pytest.raises(meswitch.FormatError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight.*I32"):
        compress(base, bad, tmp_path / "x.meswitch", progress=False)


def test_killed_compression_leaves_no_artifact(pair, tmp_path):
    base, expert = pair
    out = tmp_path / "killed.meswitch"
    script = (
        "import sys, time\n"
        "from meswitch.compress import compress, CompressionSettings\n"
        "def slow(done, total, tensor):\n"
        "    if done == 3: print('started', flush=True)\n"
        "    time.sleep(0.2)\n"
        f"compress({str(base)!r}, {str(expert)!r}, {str(out)!r}, progress=slow)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    # Only a staging directory can remain after SIGKILL; it never carries the artifact's name.
    assert all(".tmp." in p.name for p in tmp_path.iterdir())


def test_budget_planner_spends_bits_where_they_reduce_error():
    candidates = {
        "easy": [PlanChoice(1, 0, 10.0, 100), PlanChoice(2, 0, 9.0, 200), PlanChoice(4, 0, 8.5, 400)],
        "hard": [PlanChoice(1, 0, 100.0, 100), PlanChoice(2, 0, 40.0, 200), PlanChoice(4, 0, 5.0, 400)],
    }
    plan = plan_budget(candidates, {"easy": 100, "hard": 100}, avg_bits=3.0)  # 600 bits in all
    assert plan["hard"].bits == 4 and plan["easy"].bits == 2
    plan = plan_budget(candidates, {"easy": 100, "hard": 100}, avg_bits=2.0)  # 400 bits: 4-bit hard no longer fits
    assert plan["hard"].bits == 2 and plan["easy"].bits == 2
    with pytest.raises(ValueError, match="below the cheapest"):
        plan_budget(candidates, {"easy": 100, "hard": 100}, avg_bits=0.5)


def test_vocab_bits_apply_to_embedding_and_lm_head_only(pair, tmp_path):
    base, expert = pair
    report = compress(base, expert, tmp_path / "v.meswitch", settings=CompressionSettings(bits=2, vocab_bits=4,
                      group_size=32), progress=False)
    bits = {e["role"]: set() for e in report.tensors.values() if e["kind"] == "delta"}
    for entry in report.tensors.values():
        if entry["kind"] == "delta":
            bits[entry["role"]].add(entry["bits"])
    assert bits == {"linear": {2}, "embedding": {4}, "lm_head": {4}}
    # The stored codes follow: the decompressed lm_head is as close as a 4-bit quantization.
    plain = compress(base, expert, tmp_path / "p.meswitch", settings=CompressionSettings(bits=2, group_size=32),
                     progress=False)
    assert report.tensors["lm_head.weight"]["error"] < plain.tensors["lm_head.weight"]["error"] / 4
    assert report.avg_bits > plain.avg_bits


def test_avg_bits_budget_is_met(pair, tmp_path):
    base, expert = pair
    report = compress(base, expert, tmp_path / "b.meswitch", settings=CompressionSettings(avg_bits=2.5, group_size=32),
                      progress=False)
    assert report.avg_bits <= 2.5 + 1e-9
    bits = {e["bits"] for e in report.tensors.values() if e["kind"] == "delta"}
    assert len(bits) >= 1


def test_activation_aware_calibration(pair, tmp_path):
    base, expert = pair
    texts = ["hello world " * 10, "a quick test of calibration"]
    tokenizer_free = tmp_path / "calib.txt"
    tokenizer_free.write_text("\n\n".join(texts))
    from meswitch.calibration import collect_channel_second_moments

    model = transformers.AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32)

    class WordTokenizer:  # the random pair ships no tokenizer; ids from bytes are enough to drive the hooks
        def __call__(self, text, return_tensors, truncation, max_length):
            ids = torch.tensor([[b % 96 for b in text.encode()[:max_length]]])
            return {"input_ids": ids}

    stats = collect_channel_second_moments(model, WordTokenizer(), texts)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert stats[name].shape == (64,) and (stats[name] > 0).all()
    report = compress(base, expert, tmp_path / "a.meswitch", calibration=stats, progress=False)
    assert load_artifact(tmp_path / "a.meswitch").manifest["quantization"]["calibration"]["kind"] == "statistics"
    assert report.tensors[name]["kind"] == "delta"


def test_cli_compress_inspect_eval_on_the_bundled_family(tmp_path, capsys):
    from meswitch.cli import main
    from meswitch.family import family_dir

    family = family_dir()
    out = tmp_path / "math.meswitch"
    assert main(["compress", "--base", str(family / "base"), "--expert", str(family / "math"), "--bits", "2",
                 "--salient", "1%", "--ragged-groups", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "avg bits/param" in printed and "smaller" in printed
    plot = tmp_path / "errors.png"
    assert main(["inspect", str(out), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sha256 verified" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--base", str(family / "base"), "--domains", "code", "--max-examples", "4",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())["math.meswitch"]
    assert 1.0 < result["code"]["perplexity"] < 1000
    # With --no-ragged-groups the 688-wide MLP does not fit groups of 64: a clear error, exit code 1.
    assert main(["compress", "--base", str(family / "base"), "--expert", str(family / "math"), "--quiet",
                 "--no-ragged-groups", "--out", str(tmp_path / "strict.meswitch")]) == 1
    assert "does not divide the width 688" in capsys.readouterr().err


def _calibration_kl(model, teacher, tokenizer, texts) -> float:
    """Mean per-token KL(teacher || model) over ``texts``, computed independently of meswitch.refine."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:255]])
            target = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
            student = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            total += float((target.exp() * (target - student)).sum())
            count += ids.shape[1]
    return total / count


def test_learned_step_sizes_lower_the_kl_and_change_only_scales(tmp_path, capsys):
    from meswitch.calibration import read_calibration_texts
    from meswitch.evaluation import load_model
    from meswitch.family import family_dir

    torch.set_num_threads(2)
    base, expert = family_dir() / "base", family_dir() / "math"
    texts = read_calibration_texts(family_dir().parent / "calib" / "math.jsonl")[:8]
    settings = dict(bits=2, salient=0.01, ragged_groups=True)
    compress(base, expert, tmp_path / "plain.meswitch", settings=CompressionSettings(**settings),
             calibration=texts, progress=False)
    compress(base, expert, tmp_path / "refined.meswitch", settings=CompressionSettings(**settings, refine_steps=20),
             calibration=texts, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.meswitch", "refined.meswitch"]  # no intermediate
    plain, refined = load_artifact(tmp_path / "plain.meswitch"), load_artifact(tmp_path / "refined.meswitch")
    summary = refined.manifest["quantization"]["refine"]
    assert summary["steps"] == 20 and summary["kl_after"] < summary["kl_before"]
    changed = 0
    for name, entry in plain.tensors.items():
        if entry["kind"] != "delta":
            continue
        for piece in ("qweight", "zeros", "salient_idx", "salient"):
            assert np.array_equal(plain.stored(f"{name}.{piece}"), refined.stored(f"{name}.{piece}")), (name, piece)
        changed += not np.array_equal(plain.stored(f"{name}.scales"), refined.stored(f"{name}.scales"))
    assert changed == sum(e["kind"] == "delta" for e in plain.tensors.values())
    # Through the ordinary C++ dequantization path the stored scales give the KL the refinement reported.
    teacher, tokenizer = load_model(expert)
    kl_plain = _calibration_kl(load_compressed_model(base, plain)[0], teacher, tokenizer, texts)
    kl_refined = _calibration_kl(load_compressed_model(base, refined)[0], teacher, tokenizer, texts)
    assert kl_plain == pytest.approx(summary["kl_before"], rel=1e-3)
    assert kl_refined == pytest.approx(summary["kl_after"], rel=1e-3)
    assert kl_refined < kl_plain
    from meswitch.cli import main

    assert main(["inspect", str(tmp_path / "refined.meswitch")]) == 0
    assert "learned step sizes     20 steps on 8 texts" in capsys.readouterr().out


def test_learned_step_sizes_need_calibration_text(pair, tmp_path):
    base, expert = pair
    with pytest.raises(ValueError, match="refine_steps needs calibration text"):
        compress(base, expert, tmp_path / "r.meswitch", settings=CompressionSettings(refine_steps=5), progress=False)
    assert not list(tmp_path.iterdir())
