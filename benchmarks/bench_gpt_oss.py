"""Batch-1 decode of a GPT-OSS-20B-shaped model behind a 16 GB/s link: MXFP4 experts against
bf16 experts, side by side, each against its bound.

Model: openai/gpt-oss-20b's config.json cut to 4 layers, with a vocabulary of 32000 instead of
201088 (the larger one adds an embedding row and an lm_head product per token, the same for
both variants, and no expert traffic): hidden 2880, 32 experts of width 2880, top-4, 64 heads
/ 8 KV heads of head_dim 64 with biases and sinks, layers alternating sliding-window (128) and
full attention, YaRN rotary scaling (factor 32, beta_fast 32, beta_slow 1,
original_max_position_embeddings 4096, truncate false, rope_theta 150000), the clamped SwiGLU
(swiglu_limit 7.0). Two random checkpoints, written tensor by tensor (in memory: a shard of at
most 2 GB and the tensor being made) into --workdir (default ~/.cache/offload_rt_bench) and
reused after:
  mxfp4: the release's layout, `mlp.experts.gate_up_proj_blocks` / `_scales` and
         `down_proj_blocks` / `_scales` with random e2m1 codes and exponents 2^-8 .. 2^-6
         (weights of RMS about 0.03), and `quantization_config.quant_method` "mxfp4";
  bf16:  transformers' layout, `mlp.experts.gate_up_proj` (E, D, 2F) and `down_proj` (E, F, D),
         holding the weights those codes stand for (exact in bfloat16), so both checkpoints
         compute the same function;
every other tensor (random, std 0.02, as the release's initializer_range; norms 1; expert
biases included) is the same bfloat16 tensor in both. Both run in bfloat16: the runtime moves
MXFP4 experts packed and dequantizes them to bfloat16 on use.

Two phases, each holding both variants and alternating them round by round (each run warms
its model, every expert once, so every run starts from the same cache state; then prefills
the round's 16-token prompt, the same for both, and times --steps greedy decode steps):
  capped:   cache_experts a quarter of the experts (32 of 128) behind a simulated --link-gbps
            link, `load`'s defaults otherwise (prefetch on; --no-prefetch: loads on demand
            only): bytes moved per token (`bytes_loaded` gained / steps), as expert loads
            per token, of which wasted prefetches, misses per token, the compute thread's wait
            on loads per token, tokens/s; the link bound (link bytes/s / bytes per token: what
            the link alone allows) and tokens/s against it; the ratios mxfp4 / bf16;
  resident: every expert resident, no link: tokens/s, this machine's compute alone; with the
            link time, the bound 1 / max(compute, link time) per token and tokens/s against it.
Figures are medians over --rounds; the packed expert sizes and whether the two variants' greedy
tokens agree are printed too.

Run from the repository root: `PYTHONPATH=. python3 benchmarks/bench_gpt_oss.py` (about 5
minutes on 2 cores; the first run writes the checkpoints, 7.0 and 2.4 GB, in about 1.5 minutes
more; each phase holds about 8.3 GiB of anonymous memory); `--quick`: 2 layers of 8
experts, 4 steps, 1 round, a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bench_offload
import torch
from bench_families import cpu_model, memory, utc_now
from bench_local import make_prompts
from bench_offload import Run, per_token
from transformers import GptOssConfig, GptOssForCausalLM

import offload_rt
from offload_rt.experts.formats import expert_nbytes
from offload_rt.experts.mxfp4 import GROUP, dequantize_mxfp4_new
from offload_rt.models import read_config
from offload_rt.tools.writer import write_checkpoint

LAYERS = 4
MODEL = dict(  # openai/gpt-oss-20b's config.json, cut to LAYERS layers, vocab 32000, no EOS
    vocab_size=32000,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=LAYERS,
    num_local_experts=32,
    num_experts_per_tok=4,
    experts_per_token=4,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    attention_bias=True,
    sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
    rope_theta=150000,
    rope_scaling=dict(
        rope_type="yarn",
        factor=32.0,
        beta_fast=32.0,
        beta_slow=1.0,
        original_max_position_embeddings=4096,
        truncate=False,
    ),
    max_position_embeddings=131072,
    initial_context_length=4096,
    rms_norm_eps=1e-5,
    swiglu_limit=7.0,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
)
QUICK = dict(  # --quick: 2 layers of 8 experts
    num_hidden_layers=2, num_local_experts=8, layer_types=["sliding_attention", "full_attention"]
)
MXFP4_CONFIG = {  # as the release's config.json has it
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
VARIANTS = ("bf16", "mxfp4")  # bf16 first: the baseline
STD = 0.02  # random dense weights: the release's initializer_range
EXPONENTS = (119, 122)  # e8m0 bytes drawn from [119, 122): scales 2^-8 .. 2^-6, RMS 0.03
SHARD_BYTES = 2 * 10**9
GB = 1e9


@dataclass(frozen=True)
class Options:
    workdir: Path  # where the two checkpoints are cached
    model: dict  # GptOssConfig fields
    steps: int  # timed decode steps per run
    rounds: int  # runs per variant and phase; medians reported
    link_gbps: float | None  # the simulated link; None: the device's real one (a GPU)
    prefetch: bool | None  # of the capped runs; None: load's default (on behind a link)
    device: torch.device


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "offload_rt_bench")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--rounds", type=int, default=5, help="runs per variant; medians reported")
    p.add_argument(
        "--link-gbps", type=float, default=None, help="simulated link (default: 16 on a CPU)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (cuda: the real link)")
    p.add_argument("--no-prefetch", action="store_true", help="capped runs load on demand only")
    p.add_argument("--quick", action="store_true", help="2 layers of 8 experts, 4 steps, 1 round")
    a = p.parse_args()
    dev = torch.device(a.device)
    link = a.link_gbps if a.link_gbps is not None or dev.type == "cuda" else 16.0
    prefetch = False if a.no_prefetch else None
    if a.quick:
        return Options(a.workdir, {**MODEL, **QUICK}, 4, 1, link, prefetch, dev)
    return Options(a.workdir, MODEL, a.steps, a.rounds, link, prefetch, dev)


def checkpoints(workdir: Path, model: dict) -> dict[str, Path]:
    """The two checkpoint folders, each written on first use (to a temporary name, then
    renamed, so an interrupted build is never reused)."""
    name = f"gpt-oss-20b-{model['num_hidden_layers']}l"
    if model["num_local_experts"] != MODEL["num_local_experts"]:
        name += f"-e{model['num_local_experts']}"
    folders = {v: workdir / f"{name}-{v}" for v in VARIANTS}
    for variant, folder in folders.items():
        if (folder / "config.json").is_file():
            continue
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"writing a random checkpoint to {folder} ...", flush=True)
        start = time.perf_counter()
        config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **model}
        config["torch_dtype"] = "bfloat16"
        if variant == "mxfp4":
            config["quantization_config"] = MXFP4_CONFIG
        write_checkpoint(partial, config, tensors(model, variant), SHARD_BYTES)
        partial.rename(folder)
        print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    return folders


def tensors(model: dict, variant: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The variant's tensors one at a time, named and shaped as transformers' model has them
    (built on the meta device: no memory; from a copy, as the config rewrites
    rope_scaling in place); each drawn from a generator seeded by its place,
    so both variants get the same dense tensors and the same expert codes."""
    with torch.device("meta"):
        shapes = {
            n: t.shape
            for n, t in GptOssForCausalLM(GptOssConfig(**copy.deepcopy(model))).state_dict().items()
        }
    for seed, (name, shape) in enumerate(shapes.items()):
        gen = torch.Generator().manual_seed(seed)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            yield from experts(name, shape, variant, gen)
        elif name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=torch.bfloat16)
        else:
            yield name, (torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)


def experts(
    name: str, shape: torch.Size, variant: str, gen: torch.Generator
) -> Iterator[tuple[str, torch.Tensor]]:
    """A layer's fused expert weight: random MXFP4 codes and exponents as released (rows
    (E, out, in / 32, 16)), or the bfloat16 weight they stand for as transformers stores it
    (E, in, out)."""
    e, cols, rows = shape  # (E, in, out)
    blocks = torch.randint(0, 256, (e, rows, cols // GROUP, GROUP // 2), generator=gen)
    scales = torch.randint(*EXPONENTS, (e, rows, cols // GROUP), generator=gen)
    blocks, scales = blocks.to(torch.uint8), scales.to(torch.uint8)
    if variant == "mxfp4":
        yield name + "_blocks", blocks
        yield name + "_scales", scales
        return
    weight = dequantize_mxfp4_new(blocks, scales, torch.bfloat16)  # (E, out, in)
    del blocks, scales
    stored = weight.transpose(1, 2).contiguous()
    del weight
    yield name, stored


def measure(
    folders: dict[str, Path], prompts: list[list[int]], opts: Options, **load: object
) -> dict[str, list[Run]]:
    """Both variants loaded at once and run in turn, round by round (bench_offload's runs)."""
    runs: dict[str, list[Run]] = {v: [] for v in folders}
    with contextlib.ExitStack() as stack:
        models = {
            v: stack.enter_context(
                offload_rt.load(folder, device=opts.device, dtype="bfloat16", **load)
            )
            for v, folder in folders.items()
        }
        for i, prompt in enumerate(prompts):
            for v, m in models.items():
                m.warm()
                runs[v].append(bench_offload.decode(m, prompt, opts.steps))
            print(f"round {i + 1}/{len(prompts)} done", flush=True)
        print(f"both models held: {memory()}", flush=True)
    gc.collect()
    return runs


def rate(runs: list[Run]) -> float:
    return statistics.median(len(r.tokens) / r.seconds for r in runs)


def wasted(runs: list[Run]) -> float:
    """Prefetch loads per token that moved an expert the layer did not use (median)."""
    return statistics.median(r.prefetch.get("prefetch_wasted", 0) / len(r.tokens) for r in runs)


def report(
    capped: dict[str, list[Run]],
    resident: dict[str, list[Run]],
    nbytes: dict[str, int],
    bandwidth: float,
    capacity: str,
) -> None:
    print(
        f"\n{'':>10} {f'cache {capacity} behind {bandwidth / GB:g} GB/s':^84}  "
        f"{'every expert resident':^22}\n"
        f"{'':>10} {'MB/token':>9} {'loads/tok':>9} {'wasted':>6} {'misses/tok':>10} "
        f"{'wait ms':>8} {'tok/s':>7} "
        f"{'link bound':>10} {'/bound':>7} {'ms/tok':>7}  {'tok/s':>6} {'bound':>6} {'/bound':>7}"
    )
    rows = {}
    for v in VARIANTS:
        moved, tok_s = per_token(capped[v], "bytes_loaded"), rate(capped[v])
        link_s = moved / bandwidth
        compute = rate(resident[v])
        bound = 1 / max(1 / compute, link_s)
        rows[v] = (moved, tok_s, compute)
        print(
            f"{v:>10} {moved / 1e6:>9.1f} {moved / nbytes[v]:>9.2f} {wasted(capped[v]):>6.2f} "
            f"{per_token(capped[v], 'misses'):>10.2f} "
            f"{per_token(capped[v], 'load_wait_seconds') * 1e3:>8.1f} {tok_s:>7.2f} "
            f"{1 / link_s:>10.2f} {tok_s * link_s:>7.1%} {1e3 / tok_s:>7.0f}  "
            f"{compute:>6.2f} {bound:>6.2f} {tok_s / bound:>7.0%}"
        )
    (b_moved, b_rate, b_comp), (m_moved, m_rate, m_comp) = rows["bf16"], rows["mxfp4"]
    print(
        f"{'mxfp4/bf16':>10} {m_moved / b_moved:>9.3f} {'':>9} {'':>6} {'':>10} {'':>8} "
        f"{m_rate / b_rate:>7.3f} "
        f"{b_moved / m_moved:>10.3f} {'':>7} {'':>7}  {m_comp / b_comp:>6.3f}"
    )
    print(
        "(medians over rounds. MB/token: bytes the link moved per decode token (bytes_loaded "
        "gained / steps); loads/tok: the same in packed experts; wasted: of those, prefetch "
        "loads of an expert the layer did not use; misses/tok: cache misses per token; wait "
        "ms: the compute thread waiting on loads per token; link bound: link bytes/s / bytes "
        "per token, the tokens/s the link alone allows; /bound: measured / link bound; "
        "resident tok/s: every expert on the device, no link: the compute alone; bound: "
        "1 / max(resident time, link time) per token)"
    )
    print(
        f"packed expert: mxfp4 {nbytes['mxfp4']:,} B, bf16 {nbytes['bf16']:,} B (biases "
        f"included) -> mxfp4/bf16 {nbytes['mxfp4'] / nbytes['bf16']:.4f}"
    )
    for phase, runs in (("capped", capped), ("resident", resident)):
        per_round = "; ".join(
            f"{v} " + " ".join(f"{1e3 * r.seconds / len(r.tokens):.0f}" for r in runs[v])
            for v in VARIANTS
        )
        print(f"{phase}: ms/token by round: {per_round}")


def check_tokens(capped: dict[str, list[Run]], resident: dict[str, list[Run]]) -> None:
    rounds = len(capped["bf16"])
    same = [
        all(
            runs[v][i].tokens == capped["bf16"][i].tokens
            for runs in (capped, resident)
            for v in VARIANTS
        )
        for i in range(rounds)
    ]
    distinct = len({t for r in capped["bf16"] for t in r.tokens})
    print(
        f"greedy tokens, mxfp4 against bf16, capped and resident: identical in {sum(same)} of "
        f"{rounds} rounds ({distinct} distinct tokens of {rounds * len(capped['bf16'][0].tokens)})"
    )


def main() -> None:
    opts = parse_options()
    print(
        f"{utc_now()}; CPU {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; device {opts.device}; load average "
        f"{os.getloadavg()[0]:.2f} (other work on the machine skews every figure)",
        flush=True,
    )
    folders = checkpoints(opts.workdir, opts.model)
    cfg = {v: read_config(folder) for v, folder in folders.items()}
    nbytes = {v: expert_nbytes(c, torch.bfloat16) for v, c in cfg.items()}
    total = cfg["bf16"].num_experts_total
    capacity = total // 4
    link = bench_offload.Options(
        opts.workdir, cfg["bf16"].num_hidden_layers, opts.steps, opts.rounds, opts.device,
        opts.link_gbps,
    )  # fmt: skip
    bandwidth = bench_offload.link_bytes_per_s(link, nbytes["bf16"])
    c = cfg["bf16"]
    print(
        f"model {folders['mxfp4'].parent}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.experts_per_layer} experts of width {c.moe_intermediate_size}, top-"
        f"{c.num_experts_per_tok}, {c.num_attention_heads} heads / {c.num_key_value_heads} KV "
        f"heads of {c.head_dim}, vocab {c.vocab_size}; compute in bfloat16; cache "
        f"{capacity}/{total} experts behind a {'simulated' if opts.link_gbps else 'measured'} "
        f"{bandwidth / GB:.1f} GB/s link, prefetch {'off' if opts.prefetch is False else 'on'}; "
        f"{opts.steps} decode steps after a 16-token prompt, "
        f"{opts.rounds} rounds",
        flush=True,
    )
    prompts = make_prompts(opts.rounds, c.vocab_size)
    capped = measure(
        folders, prompts, opts, cache_experts=capacity, link_gbps=opts.link_gbps,
        prefetch=opts.prefetch,
    )  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} after the capped runs", flush=True)
    resident = measure(folders, prompts, opts)
    print(f"{utc_now()}; load average {os.getloadavg()[0]:.2f} after the resident runs")
    check_tokens(capped, resident)
    report(capped, resident, nbytes, bandwidth, f"{capacity}/{total}")


if __name__ == "__main__":
    main()
