"""Checkpoint I/O against the real libraries: the `safetensors` package, PyTorch and
HF transformers. Every comparison is bit-exact (tolerance 0)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import meswitch

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, so NaN payloads and -0.0 compare exactly."""
    return np.ascontiguousarray(array).view(np.uint8)


def _torch_bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().view(torch.uint8).numpy()


def test_reads_files_written_by_the_safetensors_package(tmp_path, rng):
    tensors = {
        "f32": rng.standard_normal((7, 13)).astype(np.float32),
        "f16": rng.standard_normal((5, 3)).astype(np.float16),
        "i32": rng.integers(-1000, 1000, size=(11,)).astype(np.int32),
        "u8": rng.integers(0, 255, size=(2, 2, 3)).astype(np.uint8),
        "u32": rng.integers(0, 2**32 - 1, size=(4,), dtype=np.uint64).astype(np.uint32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }
    path = tmp_path / "numpy.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"origin": "numpy"})
    checkpoint = meswitch.open_checkpoint(path)
    assert sorted(checkpoint) == sorted(tensors)
    assert checkpoint.metadata()["origin"] == "numpy"
    for name, expected in tensors.items():
        got = checkpoint[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(_bits(got), _bits(expected))


def test_reads_bf16_files_written_by_safetensors_torch(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(9, 17).to(torch.bfloat16), "h": torch.randn(4).half()}
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    checkpoint = meswitch.open_checkpoint(path)
    assert checkpoint["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(checkpoint["w"]), _torch_bits(tensors["w"]))
    widened = checkpoint.get_array("w", widen=True)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, tensors["w"].float().numpy())
    assert torch.equal(checkpoint.get_torch("w"), tensors["w"])
    assert torch.equal(checkpoint.get_torch("h"), tensors["h"])


def test_arrays_are_zero_copy_views_and_dlpack_shares_memory(tmp_path, rng):
    path = tmp_path / "share.safetensors"
    safetensors.numpy.save_file({"a": rng.standard_normal((64, 64)).astype(np.float32)}, str(path))
    checkpoint = meswitch.open_checkpoint(path)
    first, second = checkpoint["a"], checkpoint["a"]
    assert not first.flags.writeable
    assert first.ctypes.data == second.ctypes.data  # both views of the same mapped page
    as_torch = checkpoint.get_torch("a")
    assert as_torch.data_ptr() == first.ctypes.data
    del checkpoint, second  # the views keep the mapping alive on their own
    np.testing.assert_array_equal(as_torch.numpy(), first)
    # Writing through torch touches a private copy of the page, never the file.
    as_torch[0, 0] = 1234.5
    reread = safetensors.numpy.load_file(str(path))["a"]
    assert reread[0, 0] != 1234.5


def test_files_we_write_load_in_safetensors_and_torch(tmp_path, rng):
    torch.manual_seed(1)
    ours = {
        "f32": rng.standard_normal((6, 10)).astype(np.float32),
        "f16": rng.standard_normal((3, 3)).astype(np.float16),
        "bf16": torch.randn(5, 8).to(torch.bfloat16),
        "i32": np.arange(-5, 5, dtype=np.int32),
        "u8": np.arange(7, dtype=np.uint8),
        "u32": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
    }
    path = tmp_path / "ours.safetensors"
    meswitch.save_file(ours, path, metadata={"format": "pt"})
    loaded_np = safetensors.numpy.load_file(str(path))
    for name in ("f32", "f16", "i32", "u8", "u32"):
        np.testing.assert_array_equal(_bits(loaded_np[name]), _bits(ours[name]))
    loaded_torch = safetensors.torch.load_file(str(path))
    assert torch.equal(loaded_torch["bf16"], ours["bf16"])
    assert torch.equal(loaded_torch["f32"], torch.from_numpy(ours["f32"]))
    with safetensors.safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_writing_is_atomic_and_rejects_unsupported_dtypes(tmp_path):
    path = tmp_path / "atomic.safetensors"
    meswitch.save_file({"x": np.ones(4, dtype=np.float32)}, path)
    with pytest.raises(TypeError, match="'y'.*float64"):
        meswitch.save_file({"y": np.ones(4, dtype=np.float64)}, path)
    # The failed write left the earlier file intact and no temporary behind.
    np.testing.assert_array_equal(meswitch.open_checkpoint(path)["x"], np.ones(4, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["atomic.safetensors"]


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype_name", ["F32", "F16", "BF16"])
def test_reads_sharded_transformers_checkpoints_bit_exact(tmp_path, tiny_llama, dtype_name):
    dtype = TORCH_DTYPES[dtype_name]
    model = tiny_llama.to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded save"

    checkpoint = meswitch.open_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(checkpoint) == set(state)
    assert len(checkpoint.shard_paths) == len(set(index["weight_map"].values()))
    for name, tensor in state.items():
        assert checkpoint.info(name)["dtype"] == dtype_name
        np.testing.assert_array_equal(_bits(checkpoint[name]), _torch_bits(tensor), err_msg=name)
        assert torch.equal(checkpoint.get_torch(name), tensor)


def test_a_single_file_transformers_checkpoint(tmp_path, tiny_llama):
    model = tiny_llama.to(torch.float16)
    model.save_pretrained(tmp_path)
    checkpoint = meswitch.open_checkpoint(tmp_path)
    assert checkpoint.shard_paths == [str(tmp_path / "model.safetensors")]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(checkpoint.get_torch(name), model.state_dict()[name])


def test_checkpoint_we_write_loads_in_transformers(tmp_path, tiny_llama):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama.to(torch.bfloat16)
    model.config.save_pretrained(tmp_path)
    meswitch.save_file(model.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


# --- bad input: a FormatError naming the file and the tensor, never a crash ---------------

def _write_raw(path: Path, header: dict | bytes, data: bytes, declared: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text) if declared is None else declared
    path.write_bytes(length.to_bytes(8, "little") + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize(
    ("case", "header", "data", "declared", "pattern"),
    [
        ("truncated", GOOD, bytes(20), None, r"'b'.*past the data buffer"),
        ("length past EOF", GOOD, bytes(24), 10_000, "runs past the end of the file"),
        ("overlap", {**GOOD, "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}}, bytes(16), None,
         r"'b'.*overlap"),
        ("out of range", GOOD, bytes(16), None, r"'b'.*past the data buffer"),
        ("unknown dtype", {"a": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), None,
         r"'a'.*unsupported dtype 'F64'"),
        ("shape mismatch", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None,
         r"'a'.*needs 12 bytes"),
        ("invalid json", b'{"a": [', b"", None, "not valid JSON"),
    ],
)
def test_bad_files_raise_format_error(tmp_path, case, header, data, declared, pattern):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(meswitch.FormatError, match=pattern) as error:
        meswitch.open_checkpoint(path)
    assert str(path) in str(error.value)
    assert isinstance(error.value, ValueError)


def test_missing_shard_raises_format_error(tmp_path, tiny_llama):
    tiny_llama.to(torch.float32).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(meswitch.FormatError, match=f"shard '{victim}'.*missing") as error:
        meswitch.open_checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(error.value)


def test_unknown_tensor_is_a_key_error_or_format_error(tmp_path):
    path = tmp_path / "x.safetensors"
    meswitch.save_file({"x": np.zeros(2, dtype=np.float32)}, path)
    checkpoint = meswitch.open_checkpoint(path)
    assert "y" not in checkpoint
    with pytest.raises(meswitch.FormatError, match="'y'"):
        checkpoint.get_array("y")
    with pytest.raises(KeyError):
        checkpoint["y"]
    with pytest.raises(KeyError):
        checkpoint.get_dlpack("y")
