"""The runtime's cache policies are the simulator's: a recorded run replayed in `cache-sim`
gives the runtime's own hits and misses exactly, under every policy, and no policy changes an
output."""

from __future__ import annotations

import json

import pytest

import offload_rt
from offload_rt.cli import main
from offload_rt.experts import SlotCache
from offload_rt.experts.policies import RUNTIME_POLICIES, runtime_policy
from offload_rt.grid import ExpertKey
from tests.conftest import save_reference

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
