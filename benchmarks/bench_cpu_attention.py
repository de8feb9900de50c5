"""One-query attention on the CPU, side by side: torch's 16-bit kernel, the same attention
widened to float32 first (`layers._sdpa`), and the C++ step of `model/onequery.py`.

Part 1, the attention alone: q (1, 32, 1, 32) over K, V (1, 8, S, 32) (bench_local's heads),
bfloat16 and float16, S keys from 64 to 8192; µs a call, best of --passes.
Part 2, a layer's attention step as the decoder runs it, from the stacked q/k/v product: torch's
path (rotation by `layers.split_heads`, then `layers.attend`: cache write and the widened
attention) against `onequery.attend` (all of it in one call); float32, bfloat16, float16.
Part 3, a whole decode step: bench_local's random Mixtral in bfloat16, one sequence, decoding
--new tokens greedily after a --prompt-token prompt (prefilled once, not timed), with torch's
16-bit kernel, with the widened attention, and with the C++ step; ms a token, best of
--repeats runs of --new steps.

Run from the repository root: `python benchmarks/bench_cpu_attention.py [--threads 2]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import bench_local
import torch
import torch.nn.functional as F

import offload_rt
from offload_rt.engine import BatchDecoder
from offload_rt.model import layers, onequery
from offload_rt.model.kvcache import KVCache


def best_us(fn: Callable[..., object], args: tuple, passes: int, calls: int) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def torch_16_bit(q, keys, values, mask):  # noqa: ANN001, ANN201
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def cpu_name() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--prompt", type=int, default=2000, help="prompt tokens before the timed decode")
    p.add_argument("--new", type=int, default=16, help="tokens decoded per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_name()}; {a.threads} threads; load average {os.getloadavg()}")
    print("one query, 32 heads of 32 over 8 key heads: µs a call")
    print("| dtype | keys | torch's 16-bit kernel | widened to float32 | speed-up |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for s in (64, 512, 2048, 8192):
            q = torch.randn(1, 32, 1, 32, generator=gen).to(dtype)
            kv = torch.randn(2, 1, 8, s, 32, generator=gen).to(dtype)
            calls = max(10, 20000 // s)
            args = (q, kv[0], kv[1], None)
            base = best_us(torch_16_bit, args, a.passes, calls)
            ours = best_us(layers._sdpa, args, a.passes, calls)
            print(f"| {dtype} | {s} | {base:.0f} | {ours:.0f} | {base / ours:.2f}x |")

    print("\nthe attention step from q/k/v (rotation, cache write, attention): µs a call")
    print("| dtype | keys | torch's path | C++ (onequery) | speed-up |")
    print("|---|---|---|---|---|")
    heads, kv_heads, hd = 32, 8, 32
    spec = layers.AttentionSpec(heads, kv_heads, hd, 1e-6)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s in (64, 512, 2048, 8192):
            cache = KVCache.allocate(1, 1, kv_heads, s + 1, hd, torch.device("cpu"), dtype)
            cache.keys[0].normal_(generator=gen)
            cache.values[0].normal_(generator=gen)
            tables = layers.RopeTables.build(hd, 10000.0, s + 1, torch.device("cpu"))
            pos = torch.tensor([[s]])
            rope = tables.at(pos, dtype)
            qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * hd, generator=gen).to(dtype)
            flat = qkv.view(-1)
            qkv_parts = flat.split([heads * hd, kv_heads * hd, kv_heads * hd])

            def torch_path() -> torch.Tensor:
                q, k, v = layers.split_heads(qkv, None, None, spec, rope)  # noqa: B023
                return layers.attend(q, k, v, None, pos, cache, 0, s + 1, None, s)  # noqa: B023

            def native() -> torch.Tensor:
                return onequery.attend(*qkv_parts, rope, cache, 0, s, s + 1)  # noqa: B023

            calls = max(10, 20000 // s)
            base = best_us(torch_path, (), a.passes, calls)
            ours = best_us(native, (), a.passes, calls)
            print(f"| {dtype} | {s} | {base:.0f} | {ours:.0f} | {base / ours:.2f}x |")

    folder = bench_local.checkpoint(a.workdir, bench_local.MODEL["num_hidden_layers"])
    prompt = [1 + i % 1000 for i in range(a.prompt)]
    widened = layers._sdpa
    rows = {}
    with offload_rt.load(folder, dtype=torch.bfloat16) as model, torch.inference_mode():

        def ms_per_token() -> float:
            decoder = BatchDecoder(model.model, [prompt], a.prompt + a.new * (a.repeats + 1))
            token = int(decoder.prefill()[0].argmax())
            decoder.step([token], [True])  # compile, fault the weights in
            best = float("inf")
            for _ in range(a.repeats):
                start = time.perf_counter()
                for _ in range(a.new - 1):
                    token = int(decoder.step([token], [True])[0].argmax())
                best = min(best, (time.perf_counter() - start) / (a.new - 1))
            return best * 1e3

        applies = onequery.applies
        onequery.applies = lambda *_: False  # torch's path for the first two
        for label, fn in (("torch's 16-bit kernel", torch_16_bit), ("widened", widened)):
            layers._sdpa = fn
            rows[label] = ms_per_token()
        layers._sdpa = widened
        onequery.applies = applies
        rows["C++"] = ms_per_token()
    base, wide, ours = rows["torch's 16-bit kernel"], rows["widened"], rows["C++"]
    print(f"\nbfloat16 decode after a {a.prompt}-token prompt, ms a token (best of {a.repeats}):")
    print(
        f"torch's 16-bit kernel {base:.2f}, widened {wide:.2f} ({base / wide:.2f}x), "
        f"C++ {ours:.2f} ({base / ours:.2f}x; {wide / ours:.2f}x over widened)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
