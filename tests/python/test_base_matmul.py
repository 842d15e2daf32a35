"""The runner's base GEMM on the CPU against a float64 reference, on both sides of the token
count where it leaves the dense kernel for BLAS over widened slabs.

Bound: float32 products and sums over ``in`` terms, ``(in / 8 + 17) * 2**-24 * sum |w x|``
per output (the dense kernel's stated bound; the slabs' BLAS sums stay well inside it).
"""

import pytest
import torch
from meswitch.serve.engine.base_matmul import FEW_TOKENS, base_matmul


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, FEW_TOKENS, FEW_TOKENS + 1, 40])
def test_base_matmul_matches_float64(dtype, tokens):
    generator = torch.Generator().manual_seed(tokens)
    rows, cols = 197, 333  # neither a multiple of a vector nor of a register block
    weight = (torch.randn(rows, cols, generator=generator) * 0.05).to(dtype)
    x = torch.randn(tokens, cols, generator=generator)
    out = base_matmul(x, weight)
    assert out.dtype == torch.float32 and out.shape == (tokens, rows) and out.is_contiguous()
    exact = x.double() @ weight.double().T
    bound = (cols / 8 + 17) * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
    excess = (out.double() - exact).abs() - bound
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3e}"


def test_base_matmul_of_a_token_does_not_depend_on_the_others_in_a_decode_batch():
    """A decode step's tokens go through one kernel whatever their count (up to FEW_TOKENS), so a
    sequence's output is the same bits alone and beside others."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=generator).to(torch.bfloat16)
    x = torch.randn(FEW_TOKENS, 512, generator=generator)
    together = base_matmul(x, weight)
    for t in (0, 5, FEW_TOKENS - 1):
        assert torch.equal(base_matmul(x[t:t + 1], weight)[0], together[t])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_folded_segments_multiply_base_plus_delta(dtype, monkeypatch):
    """A prefill's expert segments of more than FEW_TOKENS tokens multiply ``weight + delta`` in
    one GEMM; the other tokens the base alone. Against float64, within the same bound over
    ``|weight| + |delta|`` (the folded slab adds one float32 rounding of ``weight + delta``)."""
    from meswitch import ops
    from meswitch.serve.engine import base_matmul as module
    from meswitch.serve.engine.base_matmul import Fold, folds_apply
    from test_ops import make_delta

    monkeypatch.setattr(module, "SLAB_BYTES", 64 * 4 * 256)  # slabs of 64 rows: the delta's rows by offset

    generator = torch.Generator().manual_seed(7)
    rows, cols = 300, 256  # five slabs, the last one short
    weight = (torch.randn(rows, cols, generator=generator) * 0.05).to(dtype)
    deltas = [make_delta(rows, cols, bits, 64, k=3, seed=bits) for bits in (2, 4)]
    segments = [(0, 5), (5, 5 + FEW_TOKENS + 1), (22, 30), (30, 60)]  # base, folded, few tokens, folded
    x = torch.randn(60, cols, generator=generator)
    folds = [Fold(5, 22, lambda first, slab: ops.add_delta_rows(deltas[0], first, slab)),
             Fold(30, 60, lambda first, slab: ops.add_delta_rows(deltas[1], first, slab))]
    assert [folds_apply(b - a) for a, b in segments] == [False, True, False, True]
    out = base_matmul(x, weight, folds)
    dense = [torch.from_numpy(ops.delta_rows(d, range(rows))).double() for d in deltas]
    expected_w = [weight.double(), weight.double() + dense[0], weight.double(), weight.double() + dense[1]]
    magnitude = [weight.double().abs(), weight.double().abs() + dense[0].abs(), weight.double().abs(),
                 weight.double().abs() + dense[1].abs()]
    for (a, b), w, m in zip(segments, expected_w, magnitude):
        exact = x[a:b].double() @ w.T
        bound = (cols / 8 + 17) * 2.0**-24 * (x[a:b].double().abs() @ m.T)
        excess = (out[a:b].double() - exact).abs() - bound
        assert excess.max().item() <= 0, f"tokens {a}:{b}: worst excess {excess.max().item():.3e}"
    with pytest.raises(ValueError, match="sorted, disjoint"):
        base_matmul(x, weight, [folds[1], folds[0]])
