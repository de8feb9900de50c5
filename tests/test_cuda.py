"""Tier 5: the CUDA paths (pinned host tier, load stream, device slots). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from tests.test_exactness import PROMPTS, reference_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_against_reference(model: offload_rt.OffloadModel, hf) -> dict:
    """Prefill logits within 1e-4 of transformers' and 32 greedy tokens equal to its, for
    every prompt; returns the model's counters."""
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert (model.logits(PROMPTS[0]).cpu() - ref).abs().max().item() <= 1e-4
    got = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=32)]
    assert got == [reference_greedy(hf, p, 32) for p in PROMPTS]
    return model.stats()


@pytest.mark.parametrize("cache_experts, host_experts", [(None, None), (3, None), (1, 2), (5, 0)])
def test_cuda_matches_the_reference(reference, cache_experts, host_experts):
    folder, hf = reference
    with offload_rt.load(
        folder, device="cuda", cache_experts=cache_experts, host_experts=host_experts
    ) as model:
        assert model.device.type == "cuda"
        stats = check_against_reference(model, hf)
    if cache_experts is not None:
        assert stats["resident_max"] <= cache_experts
        assert stats["evictions"] > 0


def test_cuda_host_tier_is_pinned(reference):
    with offload_rt.load(reference[0], device="cuda", cache_experts=2) as model:
        model.generate(PROMPTS[0], max_new_tokens=4)
        store = model.backend.store
        assert store.host_buffers()
        assert all(buf.is_pinned() for buf in store.host_buffers())
        assert store.pool.device.type == "cuda"


def assert_near_greedy(hf, prompt: list[int], tokens: list[int], margin: float) -> None:
    """Each of `tokens` is the reference's greedy choice after the same prefix, or scores within
    `margin` of it there (a near-tie that a lower precision may break the other way)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # (n, V)
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]  # (n,)
    gap = logits.max(-1).values - chosen
    assert gap.max().item() <= margin, f"tokens {tokens}: gaps to the reference's best {gap}"


def test_cuda_bfloat16_stays_close_to_float32(reference):
    """bfloat16 keeps 8 bits of mantissa: logits agree with the float32 reference to a few
    hundredths, not to 1e-4. The capped cache's greedy tokens are checked by value: each is
    the reference's own choice after the same prefix, or within twice that error of it (a
    random token scores about 2 below the best on this model)."""
    folder, hf = reference
    with offload_rt.load(folder, device="cuda", dtype="bfloat16", cache_experts=4) as m:
        ours = m.logits(PROMPTS[0]).float().cpu()
        results = m.generate(PROMPTS, max_new_tokens=8)
        assert m.stats()["evictions"] > 0
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert (ours - ref).abs().max().item() < 0.1
    for prompt, r in zip(PROMPTS, results):
        assert r.token_ids and (len(r.token_ids) == 8 or r.finish_reason == "stop")
        assert_near_greedy(hf, prompt, r.token_ids, margin=0.2)


@pytest.mark.parametrize(
    "options",
    [dict(prefetch=True), dict(prefetch=True, compute_on_miss=True), dict(compute_on_miss=True)],
)
def test_cuda_prefetch_and_compute_on_miss_match_the_reference(reference, options):
    """Loads on the copy stream, prefetches and misses run by the CPU from pinned RAM: the
    CPU's kernels differ from the GPU's, so logits are held to 1e-4, tokens exactly."""
    folder, hf = reference
    with offload_rt.load(folder, device="cuda", cache_experts=3, **options) as model:
        if model.backend.planner is not None:
            model.backend.planner.cost.host_fixed_s = 0.0  # the CPU taken as free: every miss
            # whose copy would wait runs there, so the path is exercised whatever the timing
        stats = check_against_reference(model, hf)
    if options.get("compute_on_miss"):
        assert stats["host_computed"] > 0
    if options.get("prefetch"):
        assert stats["prefetch_loads"] > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(cpu_experts="auto"),
        dict(cpu_experts=3),
        dict(cpu_moe_layers=1),
        dict(cpu_experts=3, compute_on_miss=True),
    ],
)
def test_cuda_hybrid_placement_matches_the_reference(reference, options):
    """The CPU set computed by the CPU from host RAM beside CUDA slots (costs measured on the
    GPU and its real link): logits within 1e-4, tokens exactly; the set never loaded."""
    folder, hf = reference
    with offload_rt.load(folder, device="cuda", cache_experts=3, **options) as model:
        plan = model.placement.plan
        assert not plan.costs.device_is_host and plan.slots <= 3
        stats = check_against_reference(model, hf)
        assert not plan.cpu & set(model.backend.cache.resident_keys())
    if plan.cpu:
        assert stats["cpu_computed"] > 0 and stats["cpu_experts"] == len(plan.cpu)
    print(plan.format())
