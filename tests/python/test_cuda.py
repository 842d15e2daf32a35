"""meswitch.cuda: the tile layout from Python on any machine, and on a GPU the CUDA kernels against
the CPU reference of test_ops (its own packer, unpacker and float64 dequantize-then-matmul).

The tests marked ``cuda`` need a GPU and a build with MESWITCH_CUDA=ON; elsewhere they skip with
the reason (conftest.py). Tolerance on the GPU: |out - ref| <= 1e-4 * M + 1e-6, with M the
magnitude of what is accumulated (test_ops.reference's bound divided by its 1e-5), on the same
16-bit activations: the products are exact (integer codes times x), what remains is the order of
float32 sums and the tensor cores' accumulation (not round-to-nearest inside an mma), ten times
the bound the host emulation of the kernel meets. A float16 / bfloat16 ``out`` adds its rounding,
2^-11 / 2^-8 of |out|. The dequantized tiles equal the CPU reference bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from meswitch import _core, cuda, ops
from test_ops import RTOL, make_delta, reference, unpack


def dense_float32(d: dict) -> np.ndarray:
    """(code - zero) * scale in float32, then the salient values added: the CPU reference dequantization."""
    cols, group = d["cols"], d["group_size"]
    codes = unpack(d["qweight"], d["bits"], cols).astype(np.float32)
    g = np.arange(cols) // group
    dense = (codes - d["zeros"].astype(np.float32)[:, g]) * d["scales"].astype(np.float32)[:, g]
    dense[:, d["salient_idx"]] += d["salient"].astype(np.float32)
    return dense


def test_tile_layout_on_the_host_keeps_every_byte():
    d = make_delta(128, 256, 2, 64, k=5, seed=1)
    tiled = cuda.tile_on_host(d)
    assert tiled["codes"].size == d["qweight"].size  # the same words, rearranged
    assert tiled["params"].size == 128 * 4 and tiled["salient"].size == 128 * 5
    assert np.array_equal(tiled["salient_idx"], d["salient_idx"])
    # Parameters: f16 scale | zero << 16, [row_tile][group][16 rows]
    params = tiled["params"].reshape(8, 4, 16)
    assert np.array_equal((params & 0xFFFF).astype(np.uint16).view(np.float16),
                          d["scales"].reshape(8, 16, 4).transpose(0, 2, 1))
    assert np.array_equal(params >> 16, d["zeros"].reshape(8, 16, 4).transpose(0, 2, 1))
    # A known code: tile element (0, 0) is lane 0's pair 0, first element, bits 0-1 of word 0
    codes = unpack(d["qweight"], 2, 256)
    assert int(tiled["codes"][0] & 3) == codes[0, 0]
    assert int((tiled["codes"][0] >> 16) & 3) == codes[0, 1]


@pytest.mark.parametrize(("rows", "cols", "group", "match"), [
    (100, 128, 32, r"multiples of 64, got \[100, 128\]"),
    (128, 96, 32, r"multiples of 64, got \[128, 96\]"),
    (128, 128, 24, "multiple of 16 or the whole row"),
])
def test_shapes_the_kernels_do_not_take_are_refused(rows, cols, group, match):
    with pytest.raises(ValueError, match=match):
        cuda.tile_on_host(make_delta(rows, cols, 2, group, k=1, seed=2))


class CudaMemory:
    """A DLPack producer whose memory is on CUDA device 0, as CuPy or torch report it: what the
    dispatch in meswitch.ops reads (``__dlpack_device__``) before anything else."""

    shape = (2, 64)

    def __dlpack_device__(self):
        return (2, 0)


@pytest.mark.skipif(_core.CUDA, reason="this build has CUDA: the error is for builds without it")
def test_cuda_memory_on_a_build_without_cuda_is_a_clear_error():
    d = make_delta(64, 64, 2, 64, k=1, seed=3)
    with pytest.raises(RuntimeError, match=r"built without CUDA \(MESWITCH_CUDA=OFF\)"):
        ops.delta_matmul(CudaMemory(), d)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        ops.multi_delta_matmul(CudaMemory(), [d], [0, 2])
    assert not cuda.is_available() and "MESWITCH_CUDA=OFF" in cuda.unavailable_reason()


@pytest.mark.skipif(_core.CUDA, reason="this build has CUDA: the error is for builds without it")
def test_the_multi_expert_model_on_cuda_without_a_cuda_build_is_a_clear_error():
    from meswitch.family import family_dir
    from meswitch.serve import MultiExpertModel

    with pytest.raises(RuntimeError, match=r"the device tier is on a CUDA device, but this meswitch was built "
                                           r"without CUDA"):
        MultiExpertModel(family_dir() / "base", {}, device="cuda")


# ---- on a GPU ------------------------------------------------------------------------------

def gpu_reference(x: torch.Tensor, d: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x @ delta^T, allowed error) on the GPU's 16-bit activations, float64."""
    expected, allowed = reference(x.float().cpu().numpy(), d, "reference")
    return expected, allowed / RTOL * 1e-4 + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [torch.float16, torch.bfloat16])
def test_dequantized_tiles_equal_the_cpu_reference_bit_for_bit(bits, activation):
    for rows, cols, group, k in [(64, 64, 64, 3), (128, 192, 80, 7), (64, 1024, 16, 0), (192, 320, 48, 9)]:
        d = make_delta(rows, cols, bits, group, k=k, seed=bits + cols)
        dense = cuda.dequantize(cuda.to_device(d), activation).cpu().numpy()
        assert np.array_equal(dense.view(np.uint32), dense_float32(d).view(np.uint32))


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 6, 16, 40])
def test_delta_matmul_matches_the_reference(bits, activation, tokens):
    d = make_delta(256, 2048, bits, 64, k=20, seed=bits * 7 + tokens)
    x = torch.randn(tokens, 2048, device="cuda").to(activation)
    initial = torch.randn(tokens, 256, device="cuda")
    out = initial.clone()
    result = ops.delta_matmul(x, cuda.to_device(d), out)  # dispatched by device
    assert result is out
    expected, allowed = gpu_reference(x, d)
    np.testing.assert_array_less(np.abs((out - initial).cpu().numpy() - expected), allowed)


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_mixed_batch_in_one_call(out_dtype):
    experts = [make_delta(128, 1024, bits, group, k=8, seed=10 + i)
               for i, (bits, group) in enumerate([(2, 64), (4, 128), (3, 32), (1, 1024), (2, 48)])]
    on_device = [cuda.to_device(d) for d in experts]
    tokens = 37
    ids = torch.randint(0, 5, (tokens,), device="cuda", dtype=torch.int32)  # unsorted
    ids[0] = -1  # base only: untouched
    ids[-1] = 7  # no such expert: NaN rows (the device cannot raise)
    table = cuda.build_segments(ids, 5)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    initial = torch.randn(tokens, 128, device="cuda").to(out_dtype)
    out = initial.clone()
    ops.multi_delta_matmul(x, on_device, table, out)
    got, start = out.float().cpu().numpy(), initial.float().cpu().numpy()
    rounding = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[out_dtype]
    host_ids = ids.cpu().numpy()
    assert np.array_equal(got[0], start[0])
    assert np.isnan(got[-1]).all()
    for e, d in enumerate(experts):
        rows = np.flatnonzero(host_ids == e)
        if rows.size:
            expected, allowed = gpu_reference(x[torch.from_numpy(rows).cuda()], d)
            want = start[rows] + expected
            assert (np.abs(got[rows] - want) <= allowed + rounding * np.abs(want)).all()


@pytest.mark.cuda
def test_sorted_segments_and_an_expert_without_the_linear():
    d = make_delta(64, 512, 2, 64, k=4, seed=20)
    x = torch.randn(9, 512, device="cuda", dtype=torch.float16)
    out = ops.multi_delta_matmul(x, [None, cuda.to_device(d)], [0, 4, 9])  # tokens 0-3: expert 0, no delta here
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    expected, allowed = gpu_reference(x[4:], d)
    np.testing.assert_array_less(np.abs(out[4:].cpu().numpy() - expected), allowed)


@pytest.mark.cuda
def test_runs_on_the_current_stream():
    d = make_delta(128, 4096, 2, 64, k=40, seed=30)
    delta = cuda.to_device(d)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
        out = ops.delta_matmul(x, delta)
    stream.synchronize()
    expected, allowed = gpu_reference(x, d)
    np.testing.assert_array_less(np.abs(out.cpu().numpy() - expected), allowed)


@pytest.mark.cuda
def test_bad_arguments_name_themselves():
    delta = cuda.to_device(make_delta(64, 128, 2, 32, k=2, seed=40))
    x = torch.zeros(2, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="F16 or BF16"):
        ops.delta_matmul(x.float(), delta)
    with pytest.raises(ValueError, match="x has 64 columns"):
        ops.delta_matmul(torch.zeros(2, 64, device="cuda", dtype=torch.float16), delta)
    with pytest.raises(ValueError, match="out has 32 columns"):
        ops.delta_matmul(x, delta, torch.zeros(2, 32, device="cuda"))
    with pytest.raises(TypeError, match="must be a meswitch.cuda.DeviceDelta"):
        ops.delta_matmul(x, make_delta(64, 128, 2, 32, k=2, seed=40))
    with pytest.raises(ValueError, match=r"expert id 3 is outside \[-1, 2\)"):
        cuda.build_segments([0, 3], 2)
