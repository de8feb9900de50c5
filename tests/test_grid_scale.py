"""Tier 1 at the scale of Qwen3-235B-A22B's expert grid: 94 MoE layers x 128 experts =
12,032 experts. Placement, the cache index, the local backend's bookkeeping (with prefetch)
and trace files handle it; nothing here enumerates layers from 0 or assumes 8 experts."""

from __future__ import annotations

import random

import torch

from offload_rt.analysis.cachesim import simulate
from offload_rt.analysis.traces import RoutingTrace, read_trace, write_trace
from offload_rt.distributed.placement import NodeInfo, plan_placement, replan
from offload_rt.experts import ExpertStore, LocalExpertBackend, OffloadOptions, SlotCache
from offload_rt.experts.formats import FloatFormat
from offload_rt.grid import ExpertGrid, ExpertKey

# one dense first layer, as DeepSeek-V3's and some Qwen variants have: MoE from layer 1
GRID = ExpertGrid(tuple(range(1, 95)), 128)
D, F = 8, 4  # experts this small so that 12,032 of them fit in a few MB


def test_the_grid_has_every_expert_once():
    keys = list(GRID.keys())
    assert GRID.total == len(set(keys)) == 12_032
    assert GRID.first_layer == 1 and GRID.next_layer(0) == 1 and GRID.next_layer(94) is None
    assert GRID.previous_layer(1) is None and GRID.ordinal(94) == 93
    assert ExpertKey(0, 0) not in GRID and ExpertKey(94, 127) in GRID


def test_placement_of_12032_experts_over_four_gpus_and_a_replan():
    gib = 1 << 30
    nodes = [NodeInfo(f"n{i}", f"10.0.0.{i}", 1, (12 + 4 * i) * gib, 128 * gib) for i in range(4)]
    expert_bytes = 3 * 4096 * 1536 * 2  # Qwen3-235B's expert in bfloat16: 37.7 MB
    plan = plan_placement(nodes, GRID, expert_bytes)
    owners = [plan.owner(key).index for key in GRID.keys()]
    assert sorted(k for a in plan.actors for k in a.experts) == sorted(GRID.keys())
    assert len(set(owners)) == 4
    by_actor = plan.group_by_actor(GRID.layer_keys(50))
    assert sum(len(v) for v in by_actor.values()) == 128
    assert "94 MoE layers (layers 1-94) x 128 experts" in plan.format()
    survivors = replan(plan, [a.index for a in plan.actors[1:]])
    assert sorted(k for a in survivors.actors for k in a.experts) == sorted(GRID.keys())


def test_cache_index_over_the_whole_grid():
    cache = SlotCache(3000)
    for key in GRID.keys():
        if cache.lookup(key) is None:
            assert cache.acquire(key, pinned=set()) is not None
    s = cache.stats
    assert (s.misses, s.evictions, s.resident) == (12_032, 12_032 - 3000, 3000)
    assert cache.resident_keys()[0] == ExpertKey(71, 72)  # key 9032 of the walk: LRU order kept


class TinySource:
    """Every expert of the grid, made on demand from its key (no 12,032 tensors held)."""

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(layer * 1000 + expert)
        return {
            "gate": torch.randn(F, D, generator=gen),
            "up": torch.randn(F, D, generator=gen),
            "down": torch.randn(D, F, generator=gen),
        }


def test_backend_bookkeeping_with_prefetch_over_the_whole_grid():
    store = ExpertStore(TinySource(), FloatFormat(D, F, torch.float32), torch.device("cpu"), 512, 0)
    backend = LocalExpertBackend(store, SlotCache(512), GRID, OffloadOptions(prefetch=True))
    rng = random.Random(0)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two "tokens" through all 94 MoE layers, guessing the next one
        for layer in GRID.layers:
            chosen = sorted(rng.sample(range(128), 8))
            out = backend.run({ExpertKey(layer, e): x for e in chosen})
            assert len(out) == 8
            upcoming = GRID.next_layer(layer)
            if upcoming is not None:
                backend.prefetcher.fetch(upcoming, rng.sample(range(128), 8))
    backend.settle()
    s = backend.stats()
    assert s["hits"] + s["misses"] == 2 * 94 * 8 and s["resident_max"] <= 512
    assert any(k.layer == GRID.first_layer for k in backend.cache.resident_keys())
    backend.close()


def test_a_trace_of_the_whole_grid_round_trips_and_simulates(tmp_path):
    rng = random.Random(1)
    passes = tuple(
        tuple(tuple(sorted(rng.sample(range(128), 8))) for _ in GRID.layers) for _ in range(4)
    )
    trace = RoutingTrace(len(GRID.layers), GRID.experts, passes)
    write_trace(tmp_path / "t.msgpack", trace)
    back = read_trace(tmp_path / "t.msgpack")
    assert back == trace
    result = simulate(back, capacity=16, policy="lru", global_cache=True)
    assert result.hits + result.misses == 3 * 94 * 8
