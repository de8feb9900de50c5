"""Tier 1: router and grouping properties, and the import layers of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_rt.model import ExpertKey, RouterSpec, route
from offload_rt.model.moe import _logits, group_by_expert, moe_block

PACKAGE = Path(__file__).resolve().parent.parent / "offload_rt"


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9), experts=st.integers(2, 10), k=st.integers(1, 4), seed=st.integers(0, 999)
)
def test_softmax_topk_renormalise_equals_topk_softmax(n, experts, k, seed):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    x, router = torch.randn(n, 16, generator=gen), torch.randn(experts, 16, generator=gen)
    weights, chosen = route(x, router, RouterSpec(k))
    logits = torch.nn.functional.linear(x, router).float()
    top_logits, top_ids = torch.topk(logits, k, dim=-1)
    assert torch.equal(chosen, top_ids)
    torch.testing.assert_close(weights, torch.softmax(top_logits, dim=-1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(n))


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_grouped_routers_choose_and_weigh_as_transformers(family):
    """DeepSeek-V3's and GLM-4.5's sigmoid router (a correction bias only to choose, groups
    scored by their best two, renormalised, scaled) and DeepSeek-V2's group-limited softmax
    (groups scored by their best expert, scaled, not renormalised), against transformers'."""
    import transformers

    gen = torch.Generator().manual_seed(3)
    e, d, n = 16, 64, 40
    if family == "deepseek_v2":
        config = transformers.DeepseekV2Config(
            hidden_size=d,
            n_routed_experts=e,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
        )
        reference = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter
        spec = RouterSpec(3, "softmax", False, 1.5, 4, 2, "max")
    else:
        cls = "DeepseekV3Config" if family == "deepseek_v3" else "Glm4MoeConfig"
        config = getattr(transformers, cls)(
            hidden_size=d,
            n_routed_experts=e,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )
        module = getattr(transformers.models, family)
        router_name = "DeepseekV3TopkRouter" if family == "deepseek_v3" else "Glm4MoeTopkRouter"
        reference = getattr(getattr(module, f"modeling_{family}"), router_name)
        spec = RouterSpec(3, "sigmoid", True, 2.5, 4, 2, "top2")
    router = reference(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, d, generator=gen))
        correction = None
        if family != "deepseek_v2":
            correction = torch.randn(e, generator=gen) * 0.5
            router.e_score_correction_bias.copy_(correction)
    x = torch.randn(n, d, generator=gen)
    _, want_w, want_i = router(x)
    weights, experts = route(x, router.weight.detach(), spec, correction=correction)
    order, want_order = experts.argsort(dim=-1), want_i.argsort(dim=-1)
    assert torch.equal(experts.gather(1, order), want_i.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 12), seed=st.integers(0, 999))
def test_grouping_covers_every_token_choice_once(n, seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.argsort(torch.rand(n, 8, generator=gen), dim=1)[:, :2]  # distinct per token
    weights = torch.rand(n, 2, generator=gen)
    routing = group_by_expert(3, weights, chosen)
    assert routing.keys == sorted(routing.keys) and all(k.layer == 3 for k in routing.keys)
    pairs = {
        (int(r), k.expert, float(w))
        for k, rows, ws in zip(routing.keys, routing.rows, routing.weights)
        for r, w in zip(rows, ws)
    }
    want = {(t, int(chosen[t, j]), float(weights[t, j])) for t in range(n) for j in range(2)}
    assert pairs == want


class DenseBackend:
    """Every expert computed from a dense tensor: the plainest possible backend."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w  # (E, D, D): expert e is x @ w[e]
        self.calls: list[list[ExpertKey]] = []

    def run(self, groups):
        self.calls.append(sorted(groups))
        return {k: x @ self.w[k.expert] for k, x in groups.items()}


def test_moe_block_is_the_weighted_sum_of_each_tokens_experts():
    gen = torch.Generator().manual_seed(0)
    x, router = torch.randn(5, 8, generator=gen), torch.randn(4, 8, generator=gen)
    backend = DenseBackend(torch.randn(4, 8, 8, generator=gen))
    out = moe_block(x, router, RouterSpec(2), layer=1, backend=backend)
    weights, chosen = route(x, router, RouterSpec(2))
    for t in range(5):
        want = sum(weights[t, j] * (x[t] @ backend.w[chosen[t, j]]) for j in range(2))
        torch.testing.assert_close(out[t], want)
    assert len(backend.calls) == 1  # one backend call per layer, with every group in it


LAYERS = {  # module -> the offload_rt modules it may import (DESIGN.md's table)
    "config": {"grid"},
    "grid": set(),
    "hub": set(),  # hub ids to folders: huggingface_hub only
    "dtypes": {"config"},
    "checkpoint": {"config", "grid"},
    "model": {"config", "grid", "model"},
    "models": {"config", "grid", "checkpoint", "model", "models"},
    "experts": {"config", "grid", "dtypes", "checkpoint", "model", "experts"},
    "analysis": {"config", "grid", "model", "experts", "analysis"},  # traces, simulator
    "distributed": {
        "config",
        "grid",
        "dtypes",
        "checkpoint",
        "experts",
        "model",
        "models",
        "distributed",
    },
    "tools": {"config", "grid", "checkpoint", "model", "models", "experts", "tools"},
    "engine": {
        "config",
        "grid",
        "dtypes",
        "checkpoint",
        "model",
        "models",
        "experts",
        "distributed",
        "analysis",
        "engine",
        "hub",
        "results",
    },
    "demo": {"config", "checkpoint", "models", "tools"},
    "results": set(),  # plain dataclasses: no torch, nothing of the runtime
    "protocol": {"results"},
    "server": {"engine", "protocol", "results", "server"},
    "client": {"protocol", "results"},  # nothing of the engine or the server: no torch
    "convert": {"config", "checkpoint", "convert", "models", "tools"},  # an offline tool
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "offload_rt":
            names = [f"offload_rt.{a.name}" for a in node.names]  # from offload_rt import x
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("offload_rt.")}
    return found


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_router_logits_are_the_float_products_rounded_once(dtype):
    """route's 16-bit logits on the CPU: float32 sums rounded once to the dtype, so within
    half an ulp (plus float32 rounding) of the float64 product; the experts are the ones
    torch's own 16-bit product picks."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    router = (torch.randn(8, 256, generator=gen) / 16).to(dtype)
    want = x.double() @ router.double().t()
    logits = _logits(x, router, None)
    half_ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    assert logits.dtype == dtype
    assert ((logits.double() - want).abs() <= half_ulp * want.abs() + 1e-6).all()
    _, experts = route(x, router, RouterSpec(top_k=2))
    eager = torch.softmax(F.linear(x, router).float(), dim=-1)
    assert torch.equal(experts, torch.topk(eager, 2, dim=-1).indices)


def test_imports_follow_the_layers():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        if top == "__init__" or top.startswith("cli"):
            continue
        allowed = LAYERS[top]
        bad = _imports(path) - allowed
        assert not bad, f"{rel} imports {sorted(bad)}; its layer may import {sorted(allowed)}"
        if top in ("model", "config", "checkpoint"):
            assert "ray" not in path.read_text(), f"{rel} must not use ray"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_query_16_bit_attention_is_the_float64_one_rounded(dtype):
    """A decode step's attention of a 16-bit model on the CPU (widened to float32 there, as
    torch's 16-bit kernel is 2-9x slower at one query) is the float64 attention of the same
    16-bit values to the output's rounding; a prefill (many queries) is torch's own kernel,
    unchanged."""
    from offload_rt.model.kvcache import KVCache, attention_mask
    from offload_rt.model.layers import attend

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, seen = 8, 2, 16, 37
    cache = KVCache.allocate(1, 2, kv_heads, 64, hd, torch.device("cpu"), dtype)
    old = torch.randn(2, 2, kv_heads, seen, hd, generator=gen).to(dtype)
    cache.keys[0][:, :, :seen], cache.values[0][:, :, :seen] = old[0], old[1]
    q = torch.randn(2, heads, 1, hd, generator=gen).to(dtype)
    k, v = (torch.randn(2, kv_heads, 1, hd, generator=gen).to(dtype) for _ in range(2))
    positions = torch.tensor([[seen], [seen - 5]])  # the second row sees fewer keys: a mask
    mask = attention_mask(positions, seen + 1, None, None)
    got = attend(q, k, v, None, positions, cache, 0, seen + 1, mask, None)
    keys = cache.keys[0][:, :, : seen + 1].double().repeat_interleave(heads // kv_heads, 1)
    values = cache.values[0][:, :, : seen + 1].double().repeat_interleave(heads // kv_heads, 1)
    want = F.scaled_dot_product_attention(q.double(), keys, values, attn_mask=mask)
    want = want.transpose(1, 2).reshape(2, 1, heads * hd)
    assert got.dtype == dtype and got.shape == want.shape
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half an ulp, relative
    assert ((got.double() - want).abs() <= want.abs() * ulp + 1e-4).all()
    # many queries: torch's own 16-bit kernel, as before
    qs = torch.randn(1, heads, 4, hd, generator=gen).to(dtype)
    keys16 = cache.keys[0][:1, :, : seen + 1]
    values16 = cache.values[0][:1, :, : seen + 1]
    mask = attention_mask(torch.arange(seen - 3, seen + 1)[None], seen + 1, None, None)
    ks, vs = keys16[:, :, -4:].clone(), values16[:, :, -4:].clone()
    pos = torch.arange(seen - 3, seen + 1)[None]
    out = attend(qs, ks, vs, None, pos, cache.rows(1), 0, seen + 1, mask, None)
    same = F.scaled_dot_product_attention(qs, keys16, values16, attn_mask=mask, enable_gqa=True)
    assert torch.equal(out, same.transpose(1, 2).reshape(1, 4, heads * hd))
