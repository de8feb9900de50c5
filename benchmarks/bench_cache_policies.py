"""The runtime's own expert cache under each replacement policy, on a real Mixtral routing trace.

Replays `../shared/data/mixtral-8x7b-routing-trace.txt` (a prompt pass, then 773 decoded
tokens; 32 layers of 8 experts, top-2) through `LocalExpertBackend` with its `SlotCache` (tiny
stand-in experts, so that the cache's bookkeeping, not the compute, is what runs), one global
cache of K x 32 experts for K = 4 and 8 (and 2, 3, 5, 6), under every policy the runtime
takes: lru (the baseline), lfu, lrfu, markov. Beside each, the simulator's figure for the same
policy (they must be equal: one implementation of each policy serves both) and Belady's (the
simulator's optimum, which knows the future). Decode passes only, the prompt filling the
cache as in `offload-rt cache-sim`. Prints hit rates, the gain over LRU and the share of
Belady's hits, and which policy needing no future knowledge is best.

Run from the repository root: `python benchmarks/bench_cache_policies.py` (about a minute).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from offload_rt.analysis.cachesim import simulate
from offload_rt.analysis.traces import RoutingTrace, read_trace
from offload_rt.experts import ExpertStore, LocalExpertBackend, SlotCache
from offload_rt.experts.formats import FloatFormat
from offload_rt.experts.policies import DEFAULT_POLICY, RUNTIME_POLICIES, runtime_policy
from offload_rt.grid import ExpertGrid, ExpertKey

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "mixtral-8x7b-routing-trace.txt"
D, F = 8, 4  # stand-in experts: the cache, not the FFN, is measured


class StandIn:
    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {"gate": torch.ones(F, D), "up": torch.ones(F, D), "down": torch.ones(D, F)}


def replay(trace: RoutingTrace, per_layer: int, policy: str) -> tuple[int, int, float]:
    """Decode-pass hits and misses of the runtime's cache; seconds for the whole replay."""
    grid = ExpertGrid(tuple(range(trace.num_layers)), trace.num_experts)
    capacity = per_layer * trace.num_layers
    store = ExpertStore(StandIn(), FloatFormat(D, F, torch.float32), torch.device("cpu"),
                        capacity, 0)  # fmt: skip
    cache = SlotCache(capacity, runtime_policy(policy, trace.num_layers))
    backend = LocalExpertBackend(store, cache, grid)
    x = torch.zeros(1, D)
    start, prompt = time.perf_counter(), (0, 0)
    for index, layer, keys in trace.steps():
        backend.run({ExpertKey(k.layer, k.expert): x for k in keys})
        if index == 0 and layer == trace.num_layers - 1:
            prompt = (cache.stats.hits, cache.stats.misses)
    seconds = time.perf_counter() - start
    backend.close()
    return cache.stats.hits - prompt[0], cache.stats.misses - prompt[1], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--capacities", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU {model}; torch "
          f"{torch.__version__}")  # fmt: skip
    trace = read_trace(args.trace)
    print(f"trace {args.trace.name}: {len(trace.passes)} passes ({trace.decode_passes} decode) "
          f"x {trace.num_layers} layers x {trace.num_experts} experts; one global cache of "
          f"K x {trace.num_layers}; decode hit rates, the prompt filling the cache")  # fmt: skip
    best: dict[int, tuple[float, str]] = {}
    print(f"\n{'K':>2} {'policy':7} {'runtime':>8} {'sim':>7} {'vs lru':>7} {'of belady':>9} "
          f"{'replay s':>8}")  # fmt: skip
    for k in args.capacities:
        bound = simulate(trace, k, "belady", global_cache=True).hit_rate
        rates = {}
        for policy in RUNTIME_POLICIES:
            hits, misses, seconds = replay(trace, k, policy)
            rate = hits / (hits + misses)
            sim = simulate(trace, k, policy, global_cache=True)
            assert (hits, misses) == (sim.hits, sim.misses), (policy, k, hits, misses, sim)
            rates[policy] = rate
            print(f"{k:2d} {policy:7} {rate:8.4f} {sim.hit_rate:7.4f} "
                  f"{rate - rates['lru']:+7.4f} {rate / bound:9.1%} {seconds:8.2f}")  # fmt: skip
        print(f"{k:2d} {'belady':7} {'':8} {bound:7.4f} {bound - rates['lru']:+7.4f} "
              f"{1:9.1%}")  # fmt: skip
        top = max(rates.items(), key=lambda kv: kv[1])
        best[k] = (top[1], top[0])
    print("\nbest policy needing no future knowledge, by K: "
          + ", ".join(f"K={k} {p} ({r:.4f})" for k, (r, p) in best.items()))  # fmt: skip
    print(f"runtime default: {DEFAULT_POLICY}")


if __name__ == "__main__":
    main()
