"""Expert-cache policies on a real Mixtral routing trace: hit rates for K = 2..6 per layer.

Replays `../shared/data/mixtral-8x7b-routing-trace.txt` (773 decoded tokens, 32 layers, top-2;
see that folder's README) through the cache simulator with LRU (the runtime's policy, the
baseline), LFU, LRFU, `markov` (this package's policy: next-token prediction from the current
token's experts) and Belady (optimal, knows the future: the upper bound), in three settings:
  1. one cache of K experts per layer, the prompt pass filling it (`offload-rt cache-sim`);
  2. one global cache of K x 32 experts;
  3. per layer with the prompt pass left out, beside the README's reference figures, which
     were computed that way (a check that the simulator reproduces them).
Then plots hit rate against K (settings 1 and 2) to --plot, if matplotlib is installed (it is a
benchmark-only extra: `pip install matplotlib`).

Run from the repository root: `python benchmarks/bench_cachesim.py` (about 2 minutes on 2
cores, most of it the global cache; `--no-global` skips it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offload_rt.analysis.cachesim import SimResult, format_table, simulate
from offload_rt.analysis.traces import RoutingTrace, read_trace

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "mixtral-8x7b-routing-trace.txt"
POLICIES = ("lru", "lfu", "lrfu", "markov", "belady")
CAPACITIES = range(2, 7)
README_LRU = {2: 0.327, 3: 0.453, 4: 0.573, 5: 0.688, 6: 0.799}  # the trace README's table
README_BELADY = {2: 0.327, 3: 0.573, 4: 0.720, 5: 0.822, 6: 0.897}


def sweep(trace: RoutingTrace, global_cache: bool, prompt_fills: bool) -> list[SimResult]:
    return [
        simulate(trace, k, policy, global_cache=global_cache, prompt_fills=prompt_fills)
        for k in CAPACITIES
        for policy in POLICIES
    ]


def gains(results: list[SimResult], policy: str, baseline: str = "lru") -> str:
    rate = {(r.policy, r.capacity): r.hit_rate for r in results}
    cells = [f"K={k} {rate[policy, k] - rate[baseline, k]:+.3f}" for k in CAPACITIES]
    return f"{policy} - {baseline}: " + ", ".join(cells)


def readme_check(results: list[SimResult]) -> str:
    rate = {(r.policy, r.capacity): r.hit_rate for r in results}
    lines = ["  K   lru  README   belady  README"]
    for k in CAPACITIES:
        lru, opt = rate["lru", k], rate["belady", k]
        lines.append(f"{k:3d} {lru:6.3f} {README_LRU[k]:6.3f}   {opt:6.3f} {README_BELADY[k]:6.3f}")
    return "\n".join(lines)


def plot(panels: dict[str, list[SimResult]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels.items()):
        for policy in POLICIES:
            rows = [r for r in results if r.policy == policy]
            ax.plot([r.capacity for r in rows], [r.hit_rate for r in rows], "o-", label=policy)
        ax.set(title=title, xlabel="experts cached per layer (K of 8)", ylabel="hit rate")
        ax.set_xticks(list(CAPACITIES))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Expert-cache hit rate on a Mixtral-8x7B routing trace (773 decode tokens)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "cache_policies.png")
    parser.add_argument("--no-global", action="store_true", help="skip the global cache")
    args = parser.parse_args()
    trace = read_trace(args.trace)
    print(f"trace {args.trace}: {len(trace.passes)} passes ({trace.decode_passes} decode)\n")
    panels = {"one cache of K per layer": sweep(trace, False, True)}
    if not args.no_global:
        panels["one global cache of K x 32"] = sweep(trace, True, True)
    for title, results in panels.items():
        print(f"hit rate over the decode passes, {title}, prompt fills the cache:")
        print(format_table(results))
        print(gains(results, "markov") + "\n")
    print("per layer, prompt pass left out (the README's convention), beside the README:")
    print(readme_check(sweep(trace, False, False)) + "\n")
    plot(panels, args.plot)


if __name__ == "__main__":
    main()
