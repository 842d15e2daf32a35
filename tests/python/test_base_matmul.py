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
