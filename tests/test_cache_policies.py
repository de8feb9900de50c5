"""The runtime's cache policies are the simulator's: a recorded run replayed in `cache-sim`
gives the runtime's own hits and misses exactly, under every policy, and no policy changes an
output."""

from __future__ import annotations

import json
import random

import pytest

import offload_rt
from offload_rt.cli import main
from offload_rt.experts import SlotCache
from offload_rt.experts.policies import LFU, LRU, RUNTIME_POLICIES, ranks_victims, runtime_policy
from offload_rt.grid import ExpertKey
from tests.conftest import save_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: not about threads

CACHE = 12  # of 4 layers x 8 experts: 3 per layer in the simulator's global mode


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("four-layers")
    save_reference(folder, seed=5, num_hidden_layers=4)
    return folder


def _counters(out: str) -> dict[str, int]:
    line = next(ln for ln in out.splitlines() if ln.startswith("expert cache:"))
    pairs = (item.split("=") for item in line.split(":", 1)[1].split(", "))
    return {k.strip(): int(v) for k, v in pairs if k.strip() in ("hits", "misses", "evictions")}


@pytest.mark.parametrize("policy", RUNTIME_POLICIES)
def test_generate_and_cache_sim_agree_exactly(four_layers, tmp_path, capsys, policy):
    trace = tmp_path / "t.msgpack"
    args = ["generate", str(four_layers), "--token-ids", "1,17,42,99,5", "--max-new-tokens"]
    more = ["--cache-experts", str(CACHE), "--cache-policy", policy, "--no-prefetch"]
    assert main([*args, "24", *more, "--trace", str(trace)]) == 0
    runtime = _counters(capsys.readouterr().out)
    sim_args = ["cache-sim", str(trace), "--capacity", str(CACHE // 4), "--global", "--json"]
    assert main([*sim_args, "--policy", policy]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert runtime["hits"] == sim["hits"] + sim["prompt_hits"]
    assert runtime["misses"] == sim["misses"] + sim["prompt_misses"]
    assert runtime["evictions"] >= sim["evictions"] > 0


def test_no_policy_changes_an_output(four_layers):
    outputs = []
    for policy in RUNTIME_POLICIES:
        with offload_rt.load(four_layers, cache_experts=5, cache_policy=policy) as model:
            outputs.append([r.token_ids for r in model.generate([[1, 5, 9], [1, 60]], 16)])
    assert all(o == outputs[0] for o in outputs)


def test_policies_pick_different_victims_on_a_scripted_sequence():
    """a used twice, b three times, a last: LRU evicts b (least recent), LFU evicts a (least
    used, though used last)."""
    a, b, c = (ExpertKey(0, e) for e in range(3))
    left = {}
    for name in ("lru", "lfu"):
        cache = SlotCache(2, runtime_policy(name, 1))
        for now, key in enumerate((a, b, b, b, a, c)):
            if cache.lookup(key, now) is None:
                cache.acquire(key, pinned={key}, now=now)
        left[name] = {a, b} - set(cache.resident_keys())
    assert left == {"lru": {b}, "lfu": {a}}


def test_bad_policies_are_refused(four_layers):
    with pytest.raises(ValueError, match="belady needs the future"):
        offload_rt.load(four_layers, cache_policy="belady")
    with pytest.raises(ValueError, match="cache_policy 'fifo' is not one the runtime runs"):
        offload_rt.load(four_layers, cache_policy="fifo")
    with pytest.raises(ValueError, match="cache_policy: these apply to the local backend"):
        offload_rt.load(four_layers, backend="ray", cache_policy="lfu")


class UnrankedLRU(LRU):
    """LRU choosing among every candidate (overriding `choose_victim`: no rank heap)."""

    def choose_victim(self, candidates, now):
        return min(candidates, key=self.rank)


class UnrankedLFU(LFU):
    def choose_victim(self, candidates, now):
        return min(candidates, key=self.rank)


class CountingLRU(LRU):
    def __init__(self) -> None:
        super().__init__()
        self.ranked = 0

    def rank(self, key):
        self.ranked += 1
        return super().rank(key)


@pytest.mark.parametrize("policy, reference", [(LRU, UnrankedLRU), (LFU, UnrankedLFU)])
def test_the_rank_heap_evicts_what_ranking_every_candidate_does(policy, reference):
    """Random lookups, touches, demotions, pins and preferred victims on two caches, one with
    the rank heap and one ranking every candidate at each eviction: the same victims."""
    assert ranks_victims(policy()) and not ranks_victims(reference())
    caches = [SlotCache(6, policy()), SlotCache(6, reference())]
    rng = random.Random(7)
    for now in range(3000):
        key = ExpertKey(rng.randrange(2), rng.randrange(10))
        op = rng.random()
        pinned = {ExpertKey(rng.randrange(2), rng.randrange(10)) for _ in range(rng.randrange(4))}
        prefer = [ExpertKey(0, rng.randrange(10))] if rng.random() < 0.1 else []
        for cache in caches:
            if op < 0.1:
                cache.touch(key)
            elif op < 0.15:
                cache.demote(key)
            elif op < 0.2:  # a prefetch: a slot without a use
                if key not in cache:
                    cache.acquire(key, pinned, prefer, now)
            elif cache.lookup(key, now) is None:
                cache.acquire(key, pinned | {key}, prefer, now)
        assert caches[0].resident_keys() == caches[1].resident_keys()
    assert caches[0].stats == caches[1].stats and caches[0].stats.evictions > 1000


def test_an_lru_eviction_ranks_a_few_residents_not_all():
    capacity, policy = 512, CountingLRU()
    cache = SlotCache(capacity, policy)
    keys = [ExpertKey(layer, e) for layer in range(16) for e in range(128)]
    for key in keys[:capacity]:
        cache.lookup(key)
        cache.acquire(key, pinned=set())
    policy.ranked = 0
    for key in keys[capacity:]:  # every lookup a miss, every acquire an eviction
        assert cache.lookup(key) is None
        cache.acquire(key, pinned={key})
    evictions = len(keys) - capacity
    assert cache.stats.evictions == evictions
    assert policy.ranked < 8 * evictions  # ranking every candidate: 512 a eviction
