"""A batch-1 CPU decode step of this tree against the same step at another git revision.

The host's memory speed drifts by up to 1.5x within minutes on a shared VM, so two runs minutes
apart cannot tell a 5% change. This runs both trees in alternating rounds instead: each round
starts one process per tree (the revision's in a `git worktree` under --workdir), which loads
bench_cpu's checkpoint (bench_local's random Mixtral; int8 / int4 copies as bench_cpu makes them,
attention and lm_head quantized alike), warms up with two generations, then times --tokens greedy
tokens after a one-token prompt, --repeats times; each round records both trees' medians, and the
result is the median over rounds of each and their ratio. Prints the CPU, thread count and load.

Run from the repository root:
`python benchmarks/ab_cpu_step.py int4 --dtype bfloat16 --against 9fd0587 [--threads 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_families import cpu_model

ROOT = Path(__file__).resolve().parent.parent

# one process's timing, run inside a tree (its own offload_rt first on the path)
CHILD = r"""
import json, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
import torch, offload_rt, bench_local, bench_quant
weights, dtype, threads, tokens, repeats, workdir = sys.argv[2:8]
torch.set_num_threads(int(threads))
folder = bench_local.checkpoint(__import__("pathlib").Path(workdir), 8)
kw = {}
if weights.startswith("int"):
    folder = bench_quant.quantized(folder, __import__("pathlib").Path(workdir), weights, 64)
    kw["dense_quant"] = weights
with offload_rt.load(folder, dtype=getattr(torch, dtype), **kw) as model:
    assert offload_rt.__file__.startswith(sys.argv[1]), offload_rt.__file__
    for _ in range(2):
        model.generate([1], max_new_tokens=int(tokens), stop=[])
    times = []
    for _ in range(int(repeats)):
        start = time.perf_counter()
        model.generate([1], max_new_tokens=int(tokens), stop=[])
        times.append((time.perf_counter() - start) / int(tokens) * 1e3)
print(json.dumps(statistics.median(times)))
"""


def worktree(rev: str, workdir: Path) -> Path:
    """A checkout of `rev` under workdir (made once, reused while it stays at rev)."""
    commit = subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = workdir / f"tree-{commit[:12]}"
    if not tree.is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), commit],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    return tree


def step_ms(tree: Path, a: argparse.Namespace) -> float:
    args = [a.weights, a.dtype, a.threads, a.tokens, a.repeats, a.workdir]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if done.returncode != 0:
        sys.exit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", choices=["float32", "bfloat16", "float16", "int8", "int4"])
    p.add_argument("--dtype", default=None, help="activations (default: the weights' or float32)")
    p.add_argument("--against", required=True, help="the git revision to compare with")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per process")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    a = p.parse_args()
    a.dtype = a.dtype or (a.weights if not a.weights.startswith("int") else "float32")
    a.workdir.mkdir(parents=True, exist_ok=True)
    trees = {"this tree": ROOT, a.against: worktree(a.against, a.workdir)}
    print(f"CPU: {cpu_model()}; {a.threads} threads; load {os.getloadavg()}")
    print(f"{a.weights} weights, {a.dtype} activations, {a.tokens} tokens a generation")
    got: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(a.rounds):
        for name, tree in trees.items():
            got[name].append(step_ms(tree, a))
        last = ", ".join(f"{n} {v[-1]:.2f} ms" for n, v in got.items())
        print(f"round {r + 1}/{a.rounds}: {last}", flush=True)
    mine, theirs = (statistics.median(v) for v in got.values())
    print(f"medians: this tree {mine:.2f} ms a token, {a.against} {theirs:.2f} ms")
    print(f"ratio ({a.against} / this tree): {theirs / mine:.3f}x; load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
