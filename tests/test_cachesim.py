"""Tier 1: routing traces, cache policies and the cache simulator, on scripted traces and on
the real Mixtral trace in ../shared/data (skipped where that folder is absent)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import msgpack
import pytest

from offload_rt.analysis.cachesim import ExpertCaches, format_table, simulate
from offload_rt.analysis.policies import POLICIES
from offload_rt.analysis.traces import (
    RoutingTrace,
    TraceError,
    read_text_trace,
    read_trace,
    write_trace,
)
from offload_rt.cli.cachesim import add_parser, run
from offload_rt.experts.policies import LRU, Decayed
from offload_rt.model.moe import ExpertKey

SHARED_TRACE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mixtral-8x7b-routing-trace.txt"
)
CAPACITIES = range(2, 7)
README_LRU = {2: 0.327, 3: 0.453, 4: 0.573, 5: 0.688, 6: 0.799}
README_BELADY = {2: 0.327, 3: 0.573, 4: 0.720, 5: 0.822, 6: 0.897}


def one_layer(tokens: Sequence[Sequence[int]], prompt: Sequence[int] | None = None) -> RoutingTrace:
    """A 1-layer, 8-expert trace: an optional prompt pass, then one decode pass per token."""
    passes = [(tuple(prompt),)] if prompt is not None else []
    passes += [(tuple(t),) for t in tokens]
    prompts = frozenset({0}) if prompt is not None else frozenset()
    return RoutingTrace(1, 8, tuple(passes), prompts).check("scripted")


def counts(trace: RoutingTrace, capacity: int, policy: str, **kw: bool) -> tuple[int, int, int]:
    r = simulate(trace, capacity, policy, **kw)
    return r.hits, r.misses, r.evictions


# --- scripted traces: hits, misses and evictions worked out by hand --------------------------


@pytest.mark.parametrize(
    "policy, expected", [("lru", (2, 5, 3)), ("lfu", (3, 4, 2)), ("belady", (3, 4, 2))]
)
def test_recency_against_frequency(policy, expected):
    # 0,0,1,2,0,2,1 with 2 slots: at 2, LRU drops 0 (used twice) and LFU keeps it
    trace = one_layer([[0], [0], [1], [2], [0], [2], [1]])
    assert counts(trace, 2, policy) == expected


@pytest.mark.parametrize(
    "policy, expected",
    [("lru", (0, 9, 7)), ("lfu", (0, 9, 7)), ("markov", (3, 6, 4)), ("belady", (3, 6, 4))],
)
def test_cycle_longer_than_the_cache(policy, expected):
    # 0,1,2 three times in 2 slots: LRU and LFU always drop the next one needed; markov learns
    # 2->0, 0->1, 1->2 after one round and from then on hits every other token, as Belady does
    trace = one_layer([[0], [1], [2]] * 3)
    assert counts(trace, 2, policy) == expected


def test_a_tokens_experts_never_evict_each_other():
    # at (2,3) Belady, free to choose, would keep 1 (needed next) and drop 2 (never again)
    # to make room for 3; the rule forbids dropping 2, needed by the same token
    trace = one_layer([[0, 1], [2, 3], [0, 1]])
    assert counts(trace, 2, "belady") == (0, 6, 4)


class Recording(LRU):
    def __init__(self) -> None:
        super().__init__()
        self.offered: list[tuple[ExpertKey, ...]] = []

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        self.offered.append(tuple(candidates))
        return super().choose_victim(candidates, now)


def test_candidates_exclude_the_current_tokens_experts():
    policy = Recording()
    caches = ExpertCaches(3, False, policy)
    tokens = [(0, 1), (2, 3), (1, 4), (5, 6), (0, 6)]
    evictions = 0
    for now, experts in enumerate(tokens):
        keys = tuple(ExpertKey(0, e) for e in experts)
        policy.offered.clear()
        caches.lookup(keys, now)
        assert all(set(offered).isdisjoint(keys) for offered in policy.offered)
        assert set(keys) <= caches.resident[0]
        evictions += len(policy.offered)
    assert evictions == caches.evictions == 5


def test_prompt_fills_the_cache_but_is_not_counted():
    # the prompt uses 4 experts in 2 slots: the first two stay, the others run uncached
    trace = one_layer([[0, 1], [1, 2]], prompt=[0, 1, 2, 3])
    result = simulate(trace, 2, "lru")
    assert (result.hits, result.misses, result.evictions) == (3, 1, 1)
    assert result.hit_rate == 0.75
    cold = simulate(trace, 2, "lru", prompt_fills=False)
    assert (cold.hits, cold.misses, cold.evictions) == (1, 3, 1)


def test_global_cache_lends_one_layers_slots_to_another():
    # layer 1 needs one expert, layer 0 cycles through three: with 2 per layer, layer 0
    # always misses; one cache of 4 gives it three slots
    passes = tuple(((e,), (0,)) for e in [0, 1, 2, 0, 1, 2])
    trace = RoutingTrace(2, 8, passes, frozenset()).check("scripted")
    assert counts(trace, 2, "lru") == (5, 7, 4)
    assert counts(trace, 2, "lru", global_cache=True) == (8, 4, 0)


def test_capacity_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        simulate(one_layer([[0]]), 0, "lru")


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="'nope'.*lru"):
        simulate(one_layer([[0]]), 1, "nope")


def test_decayed_counts_halve_per_half_life_across_a_rebase():
    counts = Decayed(half_life=2.0)
    counts.add("a", 0.0)
    counts.add("b", 1000.0)  # past REBASE_HALF_LIVES: stored counts shrink, values do not
    assert counts.origin == 1000.0
    assert counts.get("b", 1002.0) == pytest.approx(0.5)
    assert counts.get("a", 4.0) == pytest.approx(0.25, abs=1e-12)


def test_format_table_rows_per_capacity_columns_per_policy():
    trace = one_layer([[0], [1], [0], [2]])
    results = [simulate(trace, k, p) for k in (1, 2) for p in ("lru", "belady")]
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["K", "lru", "belady"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2"]
    assert lines[2].split()[1:] == ["0.250", "0.250"]


# --- trace files -----------------------------------------------------------------------------


def write_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.txt"
    path.write_text(text)
    return path


def test_text_trace_reads_passes_layers_and_prompt(tmp_path):
    path = write_text(tmp_path, "0,1,2,3\n4,5,6,7\n3,1\n2,7\n")
    trace = read_text_trace(path, num_layers=2)
    assert trace.passes == (((0, 1, 2, 3), (4, 5, 6, 7)), ((1, 3), (2, 7)))
    assert trace.prompt_passes == frozenset({0}) and trace.decode_passes == 1
    assert trace.keys(1, 1) == (ExpertKey(1, 2), ExpertKey(1, 7))


@pytest.mark.parametrize(
    "text, fault",
    [
        ("0,1\n0,x\n", r"trace\.txt:2: expected comma-separated expert ids, got '0,x'"),
        ("0,1\n2,3\n4,5\n", r"trace\.txt: 3 lines is not a positive multiple of 2"),
        ("0,1\n1,8\n", r"trace\.txt:2: expert ids \[8\] outside 0\.\.7"),
        ("0,-1\n1,2\n", r"trace\.txt:1: expert ids \[-1\] outside 0\.\.7"),
        ("0,1\n3,3\n", r"trace\.txt:2: expert ids \[3, 3\] repeat"),
        ("0,1\n\n2,3\n4,5\n", r"trace\.txt:2: expected comma-separated expert ids, got ''"),
        ("", r"trace\.txt: 0 lines"),
    ],
)
def test_malformed_text_trace_names_file_and_line(tmp_path, text, fault):
    path = write_text(tmp_path, text)
    with pytest.raises(TraceError, match=fault):
        read_trace(path, num_layers=2)


def test_msgpack_round_trip(tmp_path):
    trace = RoutingTrace(2, 8, (((0, 1, 2), (3, 4)), ((1, 5), (0, 7))), frozenset({0}))
    path = tmp_path / "trace.msgpack"
    write_trace(path, trace)
    assert read_trace(path) == trace
    assert read_trace(path, num_layers=5) == trace  # text-only options do not apply


@pytest.mark.parametrize(
    "payload, fault",
    [
        (msgpack.packb({"format": "other"}), "not an offload_rt routing trace"),
        (msgpack.packb({"format": "offload_rt.routing_trace", "version": 9}), "trace version 9"),
        (b"\x81\xa6format", "corrupt msgpack trace"),
        (msgpack.packb({"format": b"x" * 10}, use_bin_type=True), "corrupt msgpack trace"),
        (msgpack.packb({str(i): i for i in range(17)}), "corrupt msgpack trace"),
    ],
)
def test_bad_msgpack_trace_names_the_file(tmp_path, payload, fault):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(payload)
    with pytest.raises(TraceError, match=f"bad.msgpack: {fault}"):
        read_trace(path)


def test_msgpack_trace_with_bad_expert_names_pass_and_layer(tmp_path):
    good = RoutingTrace(2, 8, (((0, 1), (3, 4)),), frozenset())
    path = tmp_path / "t.msgpack"
    write_trace(path, good)
    data = msgpack.unpackb(path.read_bytes())
    data["passes"][0][1] = [3, 9]
    path.write_bytes(msgpack.packb(data))
    with pytest.raises(TraceError, match=r"t\.msgpack: pass 0 layer 1: expert ids \[9\]"):
        read_trace(path)


def test_missing_trace_file_is_named(tmp_path):
    with pytest.raises(TraceError, match="nothere.txt: cannot read trace"):
        read_trace(tmp_path / "nothere.txt")


# --- the command -----------------------------------------------------------------------------


def cache_sim(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="offload-rt")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["cache-sim", *argv])


def test_cli_json(tmp_path, capsys):
    path = write_text(tmp_path, "0,1,2,3\n0,1,2,3\n0,1\n0,1\n0,2\n1,3\n")
    assert (
        run(
            cache_sim(
                str(path), "--capacity", "2", "--policy", "lfu", "--json", "--num-layers", "2"
            )
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "lfu" and out["capacity"] == 2 and out["global"] is False
    assert (out["hits"], out["misses"], out["hit_rate"]) == (6, 2, 0.75)


def test_cli_global_text_output(tmp_path, capsys):
    path = write_text(tmp_path, "0,1\n0,1\n0,1\n")
    assert run(cache_sim(str(path), "--capacity", "2", "--global", "--num-layers", "1")) == 0
    assert "hit rate 1.0000 (4 hits, 0 misses" in capsys.readouterr().out


def test_cli_lists_policies(capsys):
    assert run(cache_sim("--list-policies")) == 0
    names = capsys.readouterr().out.split()
    assert names == list(POLICIES)
    assert {"lru", "lfu", "belady", "markov"} <= set(names)


def test_cli_without_trace_or_capacity_says_what_is_missing():
    with pytest.raises(ValueError, match="TRACE and --capacity"):
        run(cache_sim("--policy", "lru"))


# --- the real Mixtral trace ------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_trace() -> RoutingTrace:
    if not SHARED_TRACE.is_file():
        pytest.skip(
            f"shared routing trace not found at {SHARED_TRACE} (../shared beside the clone)"
        )
    return read_trace(SHARED_TRACE)


@pytest.fixture(scope="module")
def rates(shared_trace) -> dict[tuple[str, int], float]:
    """Per-layer hit rates, prompt filling the cache, for every policy and K = 2..6."""
    return {(p, k): simulate(shared_trace, k, p).hit_rate for p in POLICIES for k in CAPACITIES}


def test_shared_trace_shape(shared_trace):
    assert (shared_trace.num_layers, len(shared_trace.passes)) == (32, 774)
    assert shared_trace.passes[0][5] == tuple(range(8)) and shared_trace.decode_passes == 773


@pytest.mark.parametrize("k", CAPACITIES)
def test_readme_reference_figures(shared_trace, k):
    # the README's figures start from an empty cache after the prompt
    lru = simulate(shared_trace, k, "lru", prompt_fills=False).hit_rate
    belady = simulate(shared_trace, k, "belady", prompt_fills=False).hit_rate
    assert lru == pytest.approx(README_LRU[k], abs=0.001)
    assert belady == pytest.approx(README_BELADY[k], abs=0.001)


@pytest.mark.parametrize("k", CAPACITIES)
def test_markov_at_least_lru_and_belady_bounds_all(rates, k):
    assert rates["markov", k] >= rates["lru", k]
    for policy in POLICIES:
        assert rates["belady", k] >= rates[policy, k], policy


def test_markov_beats_lru_where_there_is_a_choice(rates):
    # at K = 2 a top-2 token fills the cache itself, so every policy scores the same
    assert len({rates[p, 2] for p in POLICIES}) == 1
    assert all(rates["markov", k] > rates["lru", k] + 0.01 for k in range(3, 7))


def test_cli_on_the_shared_trace(shared_trace, capsys):
    assert run(cache_sim(str(SHARED_TRACE), "--capacity", "4", "--json", "--skip-prompt")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "lru" and out["capacity"] == 4
    assert out["hit_rate"] == pytest.approx(README_LRU[4], abs=0.001)
