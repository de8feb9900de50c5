"""Tier 1: the LRU slot cache and the local backend's tiers on scripted access sequences."""

from __future__ import annotations

import pytest
import torch

from offload_rt.experts import ExpertStore, LocalExpertBackend, SlotCache
from offload_rt.experts.formats import FloatFormat
from offload_rt.grid import ExpertGrid
from offload_rt.model import ExpertKey, SwiGLU

D, F = 16, 24
GRID = ExpertGrid((0, 1), 8)  # FakeSource's default: 2 layers x 8 experts
FORMAT = FloatFormat(D, F, torch.float32)


class FakeSource:
    """Random experts held in memory, with a log of every read."""

    def __init__(self, layers: int = 2, experts: int = 8, fail: set | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        # scaled by 1/sqrt(fan-in), as trained weights are: outputs of order 1, so float32
        # rounding stays far below assert_close's absolute tolerance (with unit weights the
        # outputs reach ~100 and two kernels' rounding differs by more than 1e-5)
        self.weights = {
            ExpertKey(layer, e): {
                "gate": torch.randn(F, D, generator=gen) / D**0.5,
                "down": torch.randn(D, F, generator=gen) / F**0.5,
                "up": torch.randn(F, D, generator=gen) / D**0.5,
            }
            for layer in range(layers)
            for e in range(experts)
        }
        self.reads: list[ExpertKey] = []
        self.fail = fail or set()

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        key = ExpertKey(layer, expert)
        if key in self.fail:
            raise OSError(f"disk error reading {key}")
        self.reads.append(key)
        return self.weights[key]


def make_backend(source: FakeSource, capacity: int, host: int | None = 0) -> LocalExpertBackend:
    store = ExpertStore(source, FORMAT, torch.device("cpu"), capacity, host)
    return LocalExpertBackend(store, SlotCache(capacity), GRID)


def reference(source: FakeSource, key: ExpertKey, x: torch.Tensor) -> torch.Tensor:
    w = source.weights[key]
    return torch.nn.functional.linear(
        torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T), w["down"]
    )


def keys(*experts: int, layer: int = 0) -> list[ExpertKey]:
    return [ExpertKey(layer, e) for e in experts]


def test_lru_counts_on_a_scripted_sequence():
    cache = SlotCache(2)
    a, b, c = keys(0, 1, 2)
    for key in (a, b, a, c, b, a):
        if cache.lookup(key) is None:
            assert cache.acquire(key, pinned=set()) is not None
    # a miss, b miss, a hit, c miss (evicts b), b miss (evicts a), a miss (evicts c)
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.resident, s.resident_max) == (1, 5, 3, 2, 2)
    assert cache.resident_keys() == [b, a]


def test_pinned_experts_are_never_evicted():
    cache = SlotCache(2)
    a, b, c = keys(0, 1, 2)
    cache.acquire(a, set())
    cache.acquire(b, set())
    assert cache.acquire(c, pinned={a, b}) is None
    assert cache.acquire(c, pinned={a}) is not None
    assert cache.resident_keys() == [a, c]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        SlotCache(0)


@pytest.mark.parametrize("capacity", [1, 2, 3, 8])
def test_backend_outputs_equal_direct_computation(capacity):
    source = FakeSource()
    backend = make_backend(source, capacity)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        chosen = keys(*sorted({(step * 3) % 8, (step * 5 + 1) % 8, 7}), layer=step % 2)
        groups = {k: torch.randn(3, D, generator=gen) for k in chosen}
        out = backend.run(groups)
        for k in chosen:
            torch.testing.assert_close(out[k], reference(source, k, groups[k]))
        assert backend.cache.stats.resident <= capacity
    assert backend.stats()["resident_max"] <= capacity
    backend.close()


def test_backend_counts_on_scripted_layer_calls():
    source = FakeSource()
    backend = make_backend(source, capacity=3)
    x = torch.ones(1, D)
    script = [(0, 1), (1, 2), (0, 3), (0, 1), (4, 5)]
    for experts in script:
        backend.run({k: x for k in keys(*experts)})
    s = backend.stats()
    # LRU order, oldest first: (0,1) misses -> [0,1]; (1,2) hit 1, miss 2 -> [0,1,2];
    # (0,3) hit 0, 3 evicts 1 -> [2,0,3]; (0,1) hit 0, 1 evicts 2 -> [3,0,1];
    # (4,5) 4 evicts 3, 5 evicts 0 -> [1,4,5]
    assert (s["hits"], s["misses"], s["evictions"]) == (3, 7, 4)
    assert s["bytes_loaded"] == 7 * 3 * D * F * 4
    assert source.reads == keys(0, 1, 2, 3, 1, 4, 5)
    backend.close()


@pytest.mark.parametrize("short", [0, 1])
def test_a_cache_holding_every_expert_leaves_its_policy_alone(short):
    """With a slot for every expert of the grid nothing is ever evicted, so the policy (which
    only chooses victims) is not told of uses: the counters and outputs are the same. One slot
    short of that, it is told of each."""
    source = FakeSource()
    backend = make_backend(source, capacity=GRID.total - short)
    told, on_access = [], backend.cache.policy.on_access
    backend.cache.policy.on_access = lambda key, now: told.append(key) or on_access(key, now)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(5))
    for experts in [(0, 1), (1, 2), (0, 1)]:
        out = backend.run({k: x for k in keys(*experts)})
        for key, y in out.items():
            torch.testing.assert_close(y, reference(source, key, x))
    s = backend.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (3, 3, 0)
    assert told == ([] if short == 0 else keys(0, 1, 1, 2, 0, 1))
    backend.close()


def test_a_whole_steps_uses_count_as_layer_by_layer_lookups():
    """`count_uses` (a whole step's uses at once, every expert resident for good) leaves the
    clock, the recency order and the counters as `resident`'s per-layer bookkeeping does;
    a cache that may evict refuses it."""
    steps = [[[3, 1], [0, 7]], [[1, 3], [7, 7]], [[6, 2], [0, 5]]]
    backends = [make_backend(FakeSource(), capacity=GRID.total) for _ in range(2)]
    x = torch.zeros(1, D)
    for backend in backends:
        for layer in GRID.layers:
            backend.run({k: x for k in GRID.layer_keys(layer)})
        assert backend.fixed_weights() is not None
    whole, by_layer = backends
    for chosen in steps:
        whole.count_uses(chosen)
        for layer, experts in zip(GRID.layers, chosen):
            assert by_layer.resident(keys(*experts, layer=layer)) is not None
        assert whole.eviction.now == by_layer.eviction.now
        assert whole.cache.resident_keys() == by_layer.cache.resident_keys()
        assert whole.cache.stats == by_layer.cache.stats
    assert whole.cache.stats.hits == 12
    for backend in backends:
        backend.close()
    evicting = SlotCache(4)
    evicting.acquire(ExpertKey(0, 1), ())
    with pytest.raises(ValueError, match="keeps every expert"):
        evicting.count_hits(keys(1))


def test_a_call_needing_more_experts_than_slots_still_completes():
    source = FakeSource()
    backend = make_backend(source, capacity=1)
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    chosen = keys(0, 3, 5, 6)
    out = backend.run({k: x for k in chosen})
    for k in chosen:
        torch.testing.assert_close(out[k], reference(source, k, x))
    s = backend.stats()
    assert (s["misses"], s["evictions"], s["resident_max"]) == (4, 3, 1)


def test_resident_experts_run_before_missing_ones_load(monkeypatch):
    source = FakeSource()
    backend = make_backend(source, capacity=4)
    x = torch.ones(1, D)
    backend.run({k: x for k in keys(2, 6)})
    order: list[ExpertKey] = []
    runner = backend.runner
    resident, arriving = runner.resident, runner.arriving
    monkeypatch.setattr(runner, "resident", lambda k, inp: order.append(k) or resident(k, inp))
    monkeypatch.setattr(runner, "arriving", lambda k, inp: order.append(k) or arriving(k, inp))
    backend.run({k: x for k in keys(0, 2, 5, 6)})
    assert order == keys(2, 6, 0, 5)


def test_host_tier_serves_reloads_without_touching_disk():
    source = FakeSource()
    backend = make_backend(source, capacity=1, host=None)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(2))
    for e in (0, 1, 0, 1):
        out = backend.run({ExpertKey(0, e): x})
        torch.testing.assert_close(out[ExpertKey(0, e)], reference(source, ExpertKey(0, e), x))
    assert source.reads == keys(0, 1)  # the second round came from host RAM
    assert backend.stats()["host_resident"] == 2
    assert backend.stats()["misses"] == 4


def test_host_tier_capacity_is_an_lru_too():
    source = FakeSource()
    backend = make_backend(source, capacity=1, host=1)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    for e in (0, 1, 0):
        backend.run({ExpertKey(0, e): x})
    assert source.reads == keys(0, 1, 0)
    assert backend.stats()["host_resident"] == 1


def test_a_failed_load_leaves_no_half_loaded_expert():
    source = FakeSource(fail={ExpertKey(0, 3)})
    backend = make_backend(source, capacity=2)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(4))
    with pytest.raises(OSError, match="layer 0 expert 3"):
        backend.run({k: x for k in keys(1, 3)})
    assert ExpertKey(0, 3) not in backend.cache
    source.fail.clear()
    out = backend.run({k: x for k in keys(1, 3)})
    torch.testing.assert_close(out[ExpertKey(0, 3)], reference(source, ExpertKey(0, 3), x))


def test_stacked_swiglu_matches_separate_projections():
    w = FakeSource().weights[ExpertKey(0, 0)]
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(5))
    w13 = torch.cat([w["gate"], w["up"]])
    torch.testing.assert_close(
        SwiGLU(w13, w["down"])(x), reference(FakeSource(), ExpertKey(0, 0), x)
    )


def test_simulated_link_charges_every_move_and_changes_nothing():
    from offload_rt.experts.transport import SimulatedLink

    source = FakeSource()
    store = ExpertStore(source, FORMAT, torch.device("cpu"), 2, None)
    backend = LocalExpertBackend(store, SlotCache(2), GRID, link=SimulatedLink(bytes_per_s=1e9))
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(5))
    for e in (0, 1, 2, 0, 1, 2):
        key = ExpertKey(0, e)
        torch.testing.assert_close(backend.run({key: x})[key], reference(source, key, x))
    s = backend.stats()
    assert s["misses"] == 6 and source.reads == keys(0, 1, 2)  # re-loads come from host RAM
    assert s["link_seconds"] == pytest.approx(6 * 3 * D * F * 4 / 1e9)
    with pytest.raises(ValueError, match="positive bandwidth"):
        SimulatedLink(0)


class OvershootingClock:
    """perf_counter/sleep for the transport module: every sleep lasts `late` seconds too long,
    as real sleeps do (about 70 µs on the CI machine)."""

    def __init__(self, late: float) -> None:
        self.now, self.late = 100.0, late

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + self.late


def test_simulated_link_keeps_its_rate_when_sleeps_overshoot(monkeypatch):
    """Moves queued back to back end at the exact link's times, whatever each sleep adds:
    a late wake-up delays that move's end as seen, not the next move's start. A move asked
    for while the link is idle starts when it is asked for."""
    from offload_rt.experts import transport

    clock = OvershootingClock(late=0.5e-3)
    monkeypatch.setattr(transport, "time", clock)
    link = transport.SimulatedLink(bytes_per_s=1e6)  # 1 ms per 1000 bytes
    queued = clock.now
    for _ in range(10):
        link.hold(1000, queued)  # ten moves queued at once
    assert link.free_at == pytest.approx(queued + 10e-3)
    assert clock.now == pytest.approx(queued + 10e-3 + 0.5e-3)  # only the last one is late
    clock.now += 1.0  # the link idles; a move asked for now starts now
    link.hold(2000, clock.now)
    assert link.free_at == pytest.approx(clock.now - 0.5e-3)
    assert link.seconds == pytest.approx(12e-3)
