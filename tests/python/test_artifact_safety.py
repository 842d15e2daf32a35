"""Outputs never cost the user a file, and hostile artifacts are refused.

- compress / decompress refuse an output that is not theirs to replace (a user's
  directory, the current directory, an input or its parent), replace an earlier output
  only with ``force``, and swap it in with one rename: a process killed at any point
  leaves the old output or the new one.
- An artifact is read only after its manifest, shards and side files are checked:
  links, unlisted or altered side files, names leaving the directory, malformed fields
  and stored tensors that disagree with their entries are ``FormatError`` naming the
  file, tensor and field.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from meswitch import _core
from meswitch.artifact import decompress, load_artifact
from meswitch.compress import CompressionSettings, compress

FormatError = _core.FormatError
OutputPathError = _core.OutputPathError
BASE_VOCAB, EXPERT_VOCAB = 96, 100
_SAME = "model.layers.0.input_layernorm.weight"


def _config(vocab: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    tie_word_embeddings=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path]:
    """An f32 base and an expert with four added tokens; one added row holds 1e5, past f16's range."""
    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(3)
    base = transformers.LlamaForCausalLM(_config(BASE_VOCAB)).eval()
    base.save_pretrained(root / "base")
    expert = transformers.LlamaForCausalLM(_config(EXPERT_VOCAB)).eval()
    state = {}
    for name, tensor in base.state_dict().items():
        grown = expert.state_dict()[name].clone()
        rows = tensor.shape[0]
        unchanged = name == _SAME  # stored as kind "same"
        grown[:rows] = tensor if unchanged else tensor + 0.01 * torch.randn(tensor.shape)
        state[name] = grown
    state["model.embed_tokens.weight"][BASE_VOCAB, 5] = 1e5
    state["lm_head.weight"][BASE_VOCAB + 1, 7] = 1.2345678e-3  # f16 would round this
    expert.load_state_dict(state)
    expert.save_pretrained(root / "expert")
    (root / "expert" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    return root / "base", root / "expert"


def _compress(family, out: Path, bits: int = 2, **kwargs):
    base, expert = family
    return compress(base, expert, out, settings=CompressionSettings(bits=bits, group_size=32), progress=False,
                    **kwargs)


@pytest.fixture(scope="module")
def artifact(family, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "e.meswitch"
    _compress(family, out)
    return out


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- no data loss

def test_decompress_into_the_current_directory_is_refused_and_deletes_nothing(family, artifact, tmp_path, run_cli):
    base, _ = family
    (tmp_path / "notes.txt").write_text("a user's file")
    result = run_cli(["decompress", "--base", str(base), "--artifact", str(artifact), "--out", "."], tmp_path)
    _one_line_error(result, "current directory")
    assert (tmp_path / "notes.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_compress_refuses_to_write_over_its_inputs_or_their_parents(family, tmp_path, run_cli):
    base, expert = family
    before = {"base": _tree_digest(base), "expert": _tree_digest(expert)}
    for out, role in ((expert, "the expert"), (base, "the base model"), (expert.parent, "one of its parents")):
        result = run_cli(["compress", "--base", str(base), "--expert", str(expert), "--out", str(out), "--quiet"])
        _one_line_error(result, role)
        with pytest.raises(OutputPathError, match="choose another output path"):
            _compress(family, out, force=True)  # not even when forced
    assert {"base": _tree_digest(base), "expert": _tree_digest(expert)} == before


def test_decompress_refuses_its_artifact_and_base(family, artifact, tmp_path):
    base, _ = family
    before = _tree_digest(artifact)
    for out in (artifact, base, artifact.parent):
        with pytest.raises(OutputPathError, match="choose another output path"):
            decompress(base, artifact, out, force=True)
    assert _tree_digest(artifact) == before


def test_an_existing_foreign_directory_or_file_is_left_untouched(family, artifact, tmp_path):
    base, _ = family
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    a_file = tmp_path / "out.meswitch"
    a_file.write_text("a file, not a directory")
    for out in (user, a_file):
        with pytest.raises(OutputPathError, match="left untouched"):
            _compress(family, out, force=True)
        with pytest.raises(OutputPathError, match="left untouched"):
            decompress(base, artifact, out, force=True)
    # An artifact is not a decompressed model.
    with pytest.raises(OutputPathError, match="not a model written by meswitch decompress"):
        decompress(base, artifact, _copy_tree(artifact, tmp_path / "copy.meswitch"), force=True)
    assert (user / "cat.jpg").read_bytes() == b"\xff\xd8 not really"
    assert a_file.read_text() == "a file, not a directory"


def _copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_an_earlier_output_is_replaced_only_with_force(family, artifact, tmp_path):
    base, _ = family
    out = tmp_path / "e.meswitch"
    _compress(family, out, bits=2)
    with pytest.raises(OutputPathError, match="already holds a meswitch artifact; pass --force"):
        _compress(family, out, bits=3)
    assert load_artifact(out).manifest["quantization"]["bits"] == 2
    _compress(family, out, bits=3, force=True)
    assert load_artifact(out).manifest["quantization"]["bits"] == 3
    assert not list(tmp_path.glob("e.meswitch.tmp.*")), "no staging directory left behind"

    model = tmp_path / "dense"
    decompress(base, artifact, model)
    marker = json.loads((model / "meswitch_decompressed.json").read_text())
    assert marker["format"] == "meswitch-decompressed" and marker["artifact"] == "expert"
    with pytest.raises(OutputPathError, match="already holds a model written by meswitch decompress"):
        decompress(base, out, model)
    decompress(base, out, model, force=True)
    assert json.loads((model / "meswitch_decompressed.json").read_text())["artifact"] == "expert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "e.meswitch"]


def test_an_empty_directory_is_a_valid_output(family, tmp_path):
    (tmp_path / "empty.meswitch").mkdir()
    _compress(family, tmp_path / "empty.meswitch")
    assert load_artifact(tmp_path / "empty.meswitch").manifest["quantization"]["bits"] == 2


_COMPRESS_SCRIPT = """
import sys
from meswitch.compress import CompressionSettings, compress
compress(sys.argv[1], sys.argv[2], sys.argv[3], settings=CompressionSettings(bits=3, group_size=32),
         progress=False, force=True)
"""

_DECOMPRESS_SCRIPT = """
import sys
from meswitch.artifact import decompress
decompress(sys.argv[1], sys.argv[2], sys.argv[3], force=True)
"""


def _bits_of(out: Path) -> int:
    return load_artifact(out).manifest["quantization"]["bits"]  # opens with every checksum verified


@pytest.mark.parametrize("point, survivor", [("before-commit", 2), ("after-exchange", 3)])
def test_a_compression_killed_at_the_commit_leaves_the_old_or_the_new_artifact(family, tmp_path, point, survivor,
                                                                               subprocess_env):
    base, expert = family
    out = tmp_path / "e.meswitch"
    _compress(family, out, bits=2)
    result = subprocess.run([sys.executable, "-c", _COMPRESS_SCRIPT, str(base), str(expert), str(out)],
                            env=subprocess_env({"MESWITCH_CRASH_AT": point}), capture_output=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL
    assert _bits_of(out) == survivor
    assert list(tmp_path.glob("e.meswitch.tmp.*")), "the killed writer's staging directory is left"
    _compress(family, out, bits=4, force=True)  # the next writer clears what dead writers left
    assert _bits_of(out) == 4 and not list(tmp_path.glob("e.meswitch.tmp.*"))


def test_a_compression_killed_at_random_moments_never_loses_the_artifact(family, tmp_path, subprocess_env):
    base, expert = family
    out = tmp_path / "e.meswitch"
    _compress(family, out, bits=2)
    seen = set()
    for delay in (0.3, 0.8, 1.5, 2.5, 4.0):
        process = subprocess.Popen([sys.executable, "-c", _COMPRESS_SCRIPT, str(base), str(expert), str(out)],
                                   env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        seen.add(_bits_of(out))
    assert seen <= {2, 3}


@pytest.mark.parametrize("point, survivor", [("before-commit", "old"), ("after-exchange", "new")])
def test_a_decompression_killed_at_the_commit_leaves_the_old_or_the_new_model(family, artifact, tmp_path, point,
                                                                             survivor, subprocess_env):
    base, _ = family
    model = tmp_path / "dense"
    decompress(base, artifact, model)
    old = _tree_digest(model)
    other = tmp_path / "other.meswitch"
    _compress(family, other, bits=4)
    result = subprocess.run([sys.executable, "-c", _DECOMPRESS_SCRIPT, str(base), str(other), str(model)],
                            env=subprocess_env({"MESWITCH_CRASH_AT": point}), capture_output=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL
    after = _tree_digest(model)
    assert (after == old) == (survivor == "old")
    with safetensors.safe_open(model / "model.safetensors", "np") as handle:  # complete either way
        assert "lm_head.weight" in handle.keys()


# --------------------------------------------------------------------------- what an artifact holds

def test_added_vocabulary_rows_keep_the_experts_dtype_bit_for_bit(family, artifact, tmp_path):
    base, expert = family
    decompress(base, artifact, tmp_path / "dense")
    original = safetensors.numpy.load_file(expert / "model.safetensors")
    dense = safetensors.numpy.load_file(tmp_path / "dense" / "model.safetensors")
    stored = load_artifact(artifact).stored("model.embed_tokens.weight.extra_rows")
    assert stored.dtype == np.float32
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_array_equal(dense[name][BASE_VOCAB:], original[name][BASE_VOCAB:])
    assert dense["model.embed_tokens.weight"][BASE_VOCAB, 5] == 1e5


def test_shards_stay_within_max_shard_bytes(family, tmp_path):
    base, expert = family
    bound = 8_000
    compress(base, expert, tmp_path / "e.meswitch", progress=False,
             settings=CompressionSettings(bits=2, group_size=32, max_shard_bytes=bound))
    artifact = load_artifact(tmp_path / "e.meswitch")
    assert len(artifact.manifest["shards"]) > 2
    for shard in artifact.manifest["shards"]:
        with safetensors.safe_open(tmp_path / "e.meswitch" / shard["file"], "np") as handle:
            sizes = [handle.get_tensor(name).nbytes for name in handle.keys()]
        assert sum(sizes) <= bound or len(sizes) == 1, (shard["file"], sizes)


def test_side_files_are_listed_with_their_checksums(artifact):
    manifest = load_artifact(artifact).manifest
    files = {entry["path"]: entry for entry in manifest["files"]}
    assert set(files) >= {"expert/config.json", "expert/tokenizer_config.json"}
    for path, entry in files.items():
        content = (artifact / path).read_bytes()
        assert entry["sha256"] == hashlib.sha256(content).hexdigest() and entry["bytes"] == len(content)


# --------------------------------------------------------------------------- hostile artifacts

@pytest.fixture
def hostile(artifact, tmp_path) -> Path:
    """A fresh copy of the artifact for a test to tamper with."""
    return _copy_tree(artifact, tmp_path / "hostile.meswitch")


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_side_file_linking_outside_the_artifact_is_refused(family, hostile, tmp_path, run_cli):
    base, _ = family
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY")
    target = hostile / "expert" / "tokenizer_config.json"
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(FormatError, match="tokenizer_config.json: is a symbolic link"):
        load_artifact(hostile)
    result = run_cli(["decompress", "--base", str(base), "--artifact", str(hostile), "--out", str(tmp_path / "dense")])
    _one_line_error(result, "symbolic link")
    assert not (tmp_path / "dense").exists()


def test_a_side_file_altered_or_unlisted_is_refused(hostile):
    (hostile / "expert" / "config.json").write_text('{"model_type": "llama", "evil": true}')
    with pytest.raises(FormatError, match="config.json: (holds .* bytes|sha256)"):
        load_artifact(hostile)


def test_an_unlisted_side_file_is_refused(hostile):
    (hostile / "expert" / "extra.py").write_text("import os")
    with pytest.raises(FormatError, match="extra.py: is not listed in the manifest's 'files'"):
        load_artifact(hostile)


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "expert/../../escape", "expert/", "expert/a/b"])
def test_side_file_names_that_leave_the_artifact_are_refused(hostile, path):
    _edit_manifest(hostile, lambda m: m["files"].append({"path": path, "sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(FormatError, match="must be named expert/NAME"):
        load_artifact(hostile)


def test_a_shard_name_that_leaves_the_artifact_is_refused(hostile):
    _edit_manifest(hostile, lambda m: m["shards"][0].update(file="../deltas.safetensors"))
    with pytest.raises(FormatError, match="must be a plain file name"):
        load_artifact(hostile)


def _set(path: list, value):
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


_DELETE = object()
_W = "model.layers.0.mlp.up_proj.weight"
_NORM = "model.norm.weight"

MALFORMED = [
    (["format_version"], 4294967297, "unsupported format_version 4294967297"),
    (["format_version"], 2.0, "unsupported format_version 2.0"),
    (["format_version"], True, "unsupported format_version true"),
    (["format_version"], 1, "older artifacts carry no side-file checksums"),
    (["name"], 7, "field 'name' must be a string"),
    (["base"], [], "field 'base' must be an object"),
    (["quantization", "calibration"], _DELETE, "field 'quantization.calibration' is missing"),
    (["statistics", "avg_bits"], "2.5", "field 'statistics.avg_bits' must be a number"),
    (["tensors", _W, "kind"], "sparse", f"tensor '{_W}': field 'kind' must be 'same', 'full' or 'delta'"),
    (["tensors", _W, "bits"], 7, f"tensor '{_W}': field 'bits' must be an integer in [1, 4], got 7"),
    (["tensors", _W, "bits"], 3, f"tensor '{_W}.qweight'"),  # the stored codes are 2-bit wide
    (["tensors", _W, "rows"], _DELETE, f"tensor '{_W}': field 'rows' is missing"),
    (["tensors", _W, "cols"], 4294967297, "cols = 4294967297"),  # never truncated to 1
    (["tensors", _W, "salient"], -1, f"tensor '{_W}': field 'salient' must be an integer in [0, 64], got -1"),
    (["tensors", _W, "shape"], [128, 63], f"tensor '{_W}': field 'shape' [128, 63] does not match"),
    (["tensors", _W, "group_size"], 16, f"tensor '{_W}.scales'"),  # scales hold groups of 32
    (["tensors", _W, "dtype"], "F64", f"tensor '{_W}': field 'dtype': unknown dtype 'F64'"),
    (["tensors", _W], "delta", f"tensor '{_W}': entry must be an object"),
    (["tensors", _NORM, "dtype"], "F16", f"tensor '{_NORM}.full': expected F16 [64] from its manifest entry, found F32 [64]"),
    (["tensors", _NORM, "shape"], [8, 8], f"tensor '{_NORM}.full': expected F32 [8, 8] from its manifest entry, found F32 [64]"),
    (["tensors", _NORM], _DELETE, f"tensor '{_NORM}.full': stored but described by no manifest entry"),
    (["shards", 0, "sha256"], "xyz", "sha256 is not a hex digest"),
    (["files"], _DELETE, "field 'files' is missing"),
]


@pytest.mark.parametrize("path, value, message", MALFORMED, ids=[f"{'.'.join(map(str, p))}={v!r}"[:60]
                                                                  for p, v, _ in MALFORMED])
def test_a_malformed_manifest_is_a_format_error_naming_the_field(hostile, path, value, message):
    _edit_manifest(hostile, _set(path, value))
    with pytest.raises(FormatError, match="manifest.json|safetensors") as error:
        load_artifact(hostile)
    assert message in str(error.value)


def test_extra_rows_is_optional_for_every_reader(family, hostile, tmp_path):
    base, _ = family
    _edit_manifest(hostile, _set(["tensors", _W, "extra_rows"], _DELETE))
    artifact = load_artifact(hostile)
    assert artifact.tensors[_W]["extra_rows"] == 0  # filled in by the reader
    decompress(base, artifact, tmp_path / "dense")


def test_a_same_entry_that_disagrees_with_the_base_is_refused(family, hostile):
    base, _ = family
    assert load_artifact(hostile).tensors[_SAME]["kind"] == "same"
    _edit_manifest(hostile, _set(["tensors", _SAME, "shape"], [1, 2, 3]))
    with pytest.raises(FormatError, match=f"tensor '{_SAME}': entry 'same' says F32 \\[1, 2, 3\\], the base tensor is F32"):
        load_artifact(hostile).check_base(base)


def test_the_cli_replaces_an_earlier_output_only_with_force(family, artifact, tmp_path, run_cli):
    base, expert = family
    out = tmp_path / "e.meswitch"
    common = ("compress", "--base", str(base), "--expert", str(expert), "--quiet", "--group-size", "32")
    assert run_cli([*common, "--bits", "2", "--out", str(out)]).returncode == 0
    _one_line_error(run_cli([*common, "--bits", "3", "--out", str(out)]), "already holds a meswitch artifact", "--force")
    assert _bits_of(out) == 2
    assert run_cli([*common, "--bits", "3", "--out", str(out), "--force"]).returncode == 0
    assert _bits_of(out) == 3
    model = tmp_path / "dense"
    decompress_args = ("decompress", "--base", str(base), "--artifact", str(artifact), "--out", str(model))
    assert run_cli(list(decompress_args)).returncode == 0
    _one_line_error(run_cli(list(decompress_args)), "already holds a model written by meswitch decompress")
    assert run_cli([*decompress_args, "--force"]).returncode == 0


@pytest.mark.parametrize("kernel", ["portable", "sha-ni"])
def test_sha256_matches_hashlib_on_random_lengths(kernel):
    if not _core.sha256_kernel_supported(kernel):
        pytest.skip(f"this CPU cannot run the {kernel} sha256 kernel")
    rng = np.random.default_rng(11)
    lengths = [*range(130), 1 << 20, *rng.integers(0, 1 << 16, size=30).tolist()]
    for length in lengths:
        data = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
        assert _core.sha256_hex(data, kernel) == hashlib.sha256(data).hexdigest(), length
    with pytest.raises(ValueError, match="sha256 kernel must be"):
        _core.sha256_hex(b"", "md5")
