"""Tier 1: one query's attention in C++ (`model/onequery.py`) against the torch path it
replaces (`layers.split_heads` and `layers.attend`) and against float64 attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload_rt.model import onequery
from offload_rt.model.kvcache import KVCache, attention_mask
from offload_rt.model.layers import AttentionSpec, RopeTables, attend, split_heads

CPU = torch.device("cpu")
# half an ulp, relative to the value (bfloat16 keeps 8 significant bits, float16 11)
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def filled_cache(dtype: torch.dtype, kv_heads: int, hd: int, seen: int, gen) -> KVCache:
    cache = KVCache.allocate(1, 1, kv_heads, seen + 8, hd, CPU, dtype)
    cache.keys[0][:, :, :seen] = torch.randn(1, kv_heads, seen, hd, generator=gen).to(dtype)
    cache.values[0][:, :, :seen] = torch.randn(1, kv_heads, seen, hd, generator=gen).to(dtype)
    return cache


def rotated(x: torch.Tensor, hd: int, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads x (n Hd,) float64 rotated by the 16-bit tables in float64, and the sum of the
    two products' sizes (what float32 rounds against)."""
    cos, sin = (t.double().view(-1) for t in rope)
    r = cos.shape[0]
    heads = x.view(-1, hd)
    rot, rest = heads[:, :r], heads[:, r:]
    turned = torch.cat((-rot[:, r // 2 :], rot[:, : r // 2]), -1)
    out = torch.cat((rot * cos + turned * sin, rest), -1)
    sums = torch.cat(((rot * cos).abs() + (turned * sin).abs(), torch.zeros_like(rest)), -1)
    return out.reshape(-1), sums.reshape(-1)


# each axis once: dtype, head width (a multiple of 16 or not), full or partial rotation,
# already-rotated heads (rope None), few keys (one thread) or many (threads share the heads)
@pytest.mark.parametrize(
    "dtype, hd, rotary, seen",
    [
        (torch.float32, 32, 32, 37),
        (torch.bfloat16, 24, 12, 37),
        (torch.float16, 64, 64, 37),
        (torch.bfloat16, 32, None, 37),
        (torch.bfloat16, 32, 32, 700),
    ],
)
def test_one_query_attention_equals_the_torch_path(dtype, hd, rotary, seen):
    gen = torch.Generator().manual_seed(hd + seen)
    heads, kv_heads = 8, 2
    spec = AttentionSpec(heads, kv_heads, hd, 1e-6)
    mine, theirs = (filled_cache(dtype, kv_heads, hd, seen, gen) for _ in range(2))
    theirs.keys[0].copy_(mine.keys[0])
    theirs.values[0].copy_(mine.values[0])
    tables = RopeTables.build(rotary or hd, 10000.0, seen + 8, CPU)
    pos = torch.tensor([[seen]])
    rope = tables.at(pos, dtype)
    qkv = (torch.randn(1, 1, (heads + 2 * kv_heads) * hd, generator=gen) * 2).to(dtype)
    q, k, v = split_heads(qkv, None, None, spec, rope)  # the torch path: q, k rotated
    want = attend(q, k, v, None, pos, theirs, 0, seen + 1, None, seen)
    assert onequery.applies(mine, 0, dtype, None, None)
    if rotary is None:  # heads rotated before (the glue's `heads`): the kernel rotates none
        parts, rotation = (q.reshape(-1), k.reshape(-1), v.reshape(-1)), None
    else:
        flat = qkv.view(-1)
        qw, kw = heads * hd, kv_heads * hd
        parts, rotation = (flat[:qw], flat[qw : qw + kw], flat[qw + kw :]), rope
    got = onequery.attend(*parts, rotation, mine, 0, seen, seen + 1)
    assert got.dtype == dtype and got.shape == want.shape == (1, 1, heads * hd)
    # the cache: v as given; k the float64 rotation of its 16-bit values to its rounding
    # (float32 arithmetic, rounded once), every other key untouched
    assert torch.equal(mine.values[0], theirs.values[0])
    assert torch.equal(mine.keys[0][:, :, :seen], theirs.keys[0][:, :, :seen])
    new_k = mine.keys[0][0, :, seen].double()
    if rotary is None:
        assert torch.equal(new_k, k[0, :, 0].double())
        q_exact = q.double()
    else:
        flat = qkv.view(-1).double()
        k_exact, k_sums = rotated(flat[heads * hd : (heads + kv_heads) * hd], hd, rope)
        k_bound = k_exact.abs() * HALF_ULP[dtype] + k_sums * 2.0**-23
        assert ((new_k.view(-1) - k_exact).abs() <= k_bound).all()
        # q as the kernel rounds it: once, after its float32 rotation
        q_exact = rotated(flat[: heads * hd], hd, rope)[0].to(dtype).double()
        q_exact = q_exact.view(1, heads, 1, hd)
    # the output: float64 attention over the cache it wrote, to the output's rounding and
    # float32 sums; and the torch path's, to a few ulp (its k rounded otherwise)
    keys = mine.keys[0][:, :, : seen + 1].double().repeat_interleave(heads // kv_heads, 1)
    values = mine.values[0][:, :, : seen + 1].double().repeat_interleave(heads // kv_heads, 1)
    exact = F.scaled_dot_product_attention(q_exact, keys, values).transpose(1, 2)
    exact = exact.reshape(1, 1, heads * hd)
    bound = exact.abs() * HALF_ULP[dtype] + 1e-5
    assert ((got.double() - exact).abs() <= bound).all()
    close = 1e-5 if dtype == torch.float32 else 4 * HALF_ULP[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=close, atol=close)


def test_one_query_attention_leaves_what_it_does_not_do_to_torch():
    gen = torch.Generator().manual_seed(0)
    cache = filled_cache(torch.bfloat16, 2, 32, 5, gen)
    assert onequery.applies(cache, 0, torch.bfloat16, None, None)
    assert not onequery.applies(cache, 0, torch.float32, None, None)  # another dtype
    assert not onequery.applies(cache, 0, torch.bfloat16, torch.zeros(8), None)  # sinks
    mask = attention_mask(torch.tensor([[3]]), 6, None, None)
    assert not onequery.applies(cache, 0, torch.bfloat16, None, mask)  # not every key
    two_rows = KVCache.allocate(1, 2, 2, 8, 32, CPU, torch.bfloat16)
    assert not onequery.applies(two_rows, 0, torch.bfloat16, None, None)
    ring = KVCache.allocate(1, 1, 2, 8, 32, CPU, torch.bfloat16, windows=(4,))
    assert not onequery.applies(ring, 0, torch.bfloat16, None, None)
    q, kv = torch.zeros(8 * 32, dtype=torch.bfloat16), torch.zeros(2 * 32, dtype=torch.bfloat16)
    with pytest.raises(IndexError, match="do not fit a cache of 13 positions"):
        onequery.attend(q, kv, kv, None, cache, 0, 13, 14)  # past the end: an error, no write
