"""Serving throughput: N concurrent streaming clients against one, through `offload-rt serve`.

The server runs as its own process (as users run it); the clients stream through the native
msgpack endpoint with the async Python client, all from this process. Printed side by side:
tokens/s of one stream alone, of N concurrent streams (all tokens / wall time), their ratio,
the mean batch the scheduler ran, and the in-process `generate` at batch 1 as the reference
for what HTTP and streaming cost.

    python benchmarks/bench_serve.py                      # the demo checkpoint
    python benchmarks/bench_serve.py --model-dir DIR      # e.g. bench_local.py's checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import offload_rt
from offload_rt.demo import demo_name, make_demo_checkpoint

START_TIMEOUT_S = 300
WARMUP = 2  # runs of each kind before the measured ones


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the demo checkpoint")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per stream")
    p.add_argument("--cache-experts", type=int, default=None, help="server's device cache")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--repeats", type=int, default=3, help="measured runs; medians are printed")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, folder: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "offload_rt.cli", "serve", str(folder), "--port", str(port),
           "--backend", args.backend, "--max-batch", str(args.streams),
           "--log-level", "warning"]  # fmt: skip
    if args.cache_experts is not None:
        cmd += ["--cache-experts", str(args.cache_experts)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def prompts(n: int) -> list[list[int]]:
    """Token ids (every checkpoint takes them, with or without a tokenizer), 8 to 12 each."""
    return [[1] + [3 + (7 * i + 13 * j) % 250 for j in range(7 + i % 5)] for i in range(n)]


async def run_streams(url: str, texts: list[list[int]], tokens: int) -> tuple[int, float]:
    """All streams at once; returns (tokens received, seconds from first send to last token)."""

    async def one(m, prompt: list[int]) -> int:
        n = 0
        async for ids, _ in m.stream_tokens(prompt, max_new_tokens=tokens, stop=[]):
            n += len(ids)
        return n

    async with offload_rt.connect_async(url) as m:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(m, p) for p in texts))
        return sum(counts), time.perf_counter() - start


def batch_counters(url: str) -> tuple[float, float]:
    """(rows summed over decode steps, decode steps) so far, from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    rows = float(re.search(r"^offload_rt_decode_step_rows_total (\S+)$", text, re.M).group(1))
    steps = float(re.search(r"^offload_rt_decode_steps_total (\S+)$", text, re.M).group(1))
    return rows, steps


def in_process(folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Median tok/s of `generate` in this process, after the same warm-up: at batch 1, and
    for the N prompts as one static batch (the engine's own batching: the server's ceiling)."""
    kw = {} if args.backend == "ray" else {"cache_experts": args.cache_experts}
    with offload_rt.load(folder, backend=args.backend, **kw) as m:
        m.warm()  # every expert loaded once, as the server is warm after its first requests
        rates: dict[int, list[float]] = {1: [], args.streams: []}
        for _ in range(WARMUP + args.repeats):
            for n in rates:
                start = time.perf_counter()
                rs = m.generate(prompts(n), max_new_tokens=args.tokens, stop=[])
                tokens = sum(len(r.token_ids) for r in rs)
                rates[n].append(tokens / (time.perf_counter() - start))
        return tuple(statistics.median(r[WARMUP:]) for r in rates.values())  # type: ignore[return-value]


def serve_rates(url: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """Median tok/s of 1 stream and of N streams (runs alternating, after warm-up runs of
    both: Ray actors and the allocator settle over the first runs), and the mean batch."""
    one, many, rows, steps = [], [], 0.0, 0.0
    for i in range(WARMUP + args.repeats):
        n, s = asyncio.run(run_streams(url, prompts(1), args.tokens))
        rows0, steps0 = batch_counters(url)
        n_many, s_many = asyncio.run(run_streams(url, prompts(args.streams), args.tokens))
        rows1, steps1 = batch_counters(url)
        if i >= WARMUP:
            one.append(n / s)
            many.append(n_many / s_many)
            rows, steps = rows + rows1 - rows0, steps + steps1 - steps0
    return statistics.median(one), statistics.median(many), rows / max(steps, 1)


def main() -> None:
    args = parse_args()
    folder = args.model_dir or make_demo_checkpoint(Path("/tmp/offload_rt_bench") / demo_name())
    local, local_many = in_process(folder, args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, folder, port)
    try:
        single, many, batch = serve_rates(url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(
        f"model: {folder}  backend: {args.backend}  tokens per stream: {args.tokens}  "
        f"(medians of {args.repeats} runs after {WARMUP} warm-up runs)"
    )
    n = args.streams
    print(f"in-process generate, batch 1:  {local:8.1f} tok/s")
    print(f"in-process generate, batch {n:2d}: {local_many:8.1f} tok/s  "
          f"({local_many / local:.2f}x: the engine's batching, the server's ceiling)")  # fmt: skip
    print(f"server, 1 stream:              {single:8.1f} tok/s  ({single / local:.2f}x in-process)")
    print(f"server, {n:2d} streams at once:  {many:8.1f} tok/s  (mean batch {batch:.1f}, "
          f"{many / local_many:.2f}x in-process batch {n})")  # fmt: skip
    print(f"ratio {n} streams / 1 stream: {many / single:8.2f}x")


if __name__ == "__main__":
    main()
