"""kernels/attention.py ``decode_attention`` (a decode step's query heads folded onto their key/value heads) against
SDPA with ``enable_gqa``, on odd shapes, with and without a mask.

Tolerances: fp32 atol / rtol 1e-5 (largest difference seen 2e-7: the same sums in another order); bf16 2e-2, a few
units in the last place of a bf16 output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import chunk_attention, decode_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def qkv(B, H, KVH, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, 1, D, generator=g).to(dtype), *(
        torch.randn(B, KVH, N, D, generator=g).to(dtype) for _ in range(2)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, KVH, N, D",
    [
        (5, 9, 3, 37, 64),  # SmolLM's heads, an odd number of keys
        (1, 4, 4, 1, 16),  # plain multi-head, one key
        (3, 8, 1, 130, 48),  # one key/value head for all eight
        (2, 6, 2, 7, 80),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa_with_gqa(B, H, KVH, N, D, dtype, masked):
    q, k, v = qkv(B, H, KVH, N, D, dtype)
    mask = None
    if masked:  # each row its own visible keys (a ragged batch), at least one
        mask = torch.rand(B, 1, 1, N, generator=torch.Generator().manual_seed(2)) < 0.6
        mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = decode_attention(q, k, v, mask)
    assert got.shape == expected.shape == (B, H, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_a_masked_key_is_not_read():
    q, k, v = qkv(2, 6, 2, 9, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 4] = False
    before = decode_attention(q, k, v, mask)
    v[:, :, 4] += 1e3  # row 1 does not see key 4; row 0 does
    after = decode_attention(q, k, v, mask)
    torch.testing.assert_close(after[1], before[1])
    assert (after[0] - before[0]).abs().max() > 1


def test_an_output_laid_out_position_first_is_read_right(monkeypatch):
    """CUDA's memory-efficient SDPA (and older CPU kernels) return [B, G, KVH, hd] memory viewed as [B, KVH, G, hd]:
    the result must not depend on it."""
    q, k, v = qkv(2, 9, 3, 11, 16, torch.float32)
    expected = decode_attention(q, k, v)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2)
    )
    torch.testing.assert_close(decode_attention(q, k, v), expected, atol=0, rtol=0)


def test_a_decode_step_of_chunk_attention_goes_through_it():
    q, k, v = qkv(3, 9, 3, 20, 64, torch.float32)
    torch.testing.assert_close(chunk_attention(q, k, v), decode_attention(q, k, v), atol=0, rtol=0)
