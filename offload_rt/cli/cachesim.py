"""`offload-rt cache-sim`: replay a routing trace through an expert cache, print the hit rate.

    offload-rt cache-sim TRACE --capacity K --policy NAME [--json] [--global] [--skip-prompt]
    offload-rt cache-sim --list-policies

TRACE is a msgpack trace (`offload-rt generate --trace`) or the text format of
`../shared/data/mixtral-8x7b-routing-trace.txt`; `offload_rt.analysis.cachesim` gives the rules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from offload_rt.analysis.cachesim import SimResult, simulate
from offload_rt.analysis.policies import POLICIES
from offload_rt.analysis.traces import read_trace


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `cache-sim` on the `offload-rt` subcommands; returns its parser."""
    p = subparsers.add_parser("cache-sim", help="replay a routing trace through an expert cache")
    p.add_argument("trace", type=Path, nargs="?", help="msgpack or text routing trace")
    p.add_argument("--capacity", type=int, default=None, help="experts cached per layer (K)")
    p.add_argument("--policy", default="lru", choices=list(POLICIES), help="%(default)s")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--global",
        dest="global_cache",
        action="store_true",
        help="one cache of K x layers experts for all layers instead of one cache per layer",
    )
    p.add_argument(
        "--skip-prompt",
        action="store_true",
        help="leave the prompt pass out instead of letting it fill the cache (the convention "
        "of the reference figures in the shared trace's README)",
    )
    p.add_argument("--num-layers", type=int, default=32, help="text traces: layers per pass")
    p.add_argument("--num-experts", type=int, default=8, help="text traces: experts per layer")
    p.add_argument("--list-policies", action="store_true", help="print the policy names")
    return p


def _describe(result: SimResult) -> str:
    mode = "one global cache" if result.global_cache else "one cache per layer"
    prompt = "filled by the prompt" if result.prompt_fills else "empty after the prompt"
    return (
        f"policy {result.policy}, {result.capacity} experts per layer ({mode}, {prompt}): "
        f"hit rate {result.hit_rate:.4f} ({result.hits} hits, {result.misses} misses, "
        f"{result.evictions} evictions over the decode passes)"
    )


def run(args: argparse.Namespace) -> int:
    """Run `cache-sim`; usage errors and bad traces raise ValueError naming the fault."""
    if args.list_policies:
        print("\n".join(POLICIES))
        return 0
    if args.trace is None or args.capacity is None:
        raise ValueError("cache-sim needs a TRACE and --capacity K (or --list-policies)")
    trace = read_trace(args.trace, num_layers=args.num_layers, num_experts=args.num_experts)
    result = simulate(
        trace,
        args.capacity,
        args.policy,
        global_cache=args.global_cache,
        prompt_fills=not args.skip_prompt,
    )
    if args.json:
        out = result.as_dict()
        out["global"] = out.pop("global_cache")
        print(json.dumps(out))
    else:
        print(_describe(result))
    return 0
