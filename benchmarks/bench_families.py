"""Decode throughput of an MoE family's model: offload_rt against transformers, and behind a link.

Models (--family), random, written once with `save_pretrained` into --workdir (default
~/.cache/offload_rt) and reused afterwards, float32:
  qwen3_moe (default): a Qwen3-30B-A3B-shaped `Qwen3MoeForCausalLM` cut to 2 layers (hidden
      2048, 128 experts of width 768, top-8 renormalised, 32 heads / 4 KV heads of 128, vocab
      32000; one expert 18.9 MB, 4.8 GB of experts);
  deepseek_v2: a DeepSeek-V2-Lite-shaped `DeepseekV2ForCausalLM` cut to 3 layers, the first
      dense (width 10944), then 2 MoE layers (hidden 2048, 64 experts of width 1408, top-6
      softmax `greedy` not renormalised, 2 shared experts; multi-head latent attention with
      16 heads, kv_lora_rank 512, no query latent; vocab cut to 32000 from 102400, no YaRN;
      one expert 34.6 MB, 4.4 GB of experts).

Part 1, against transformers: greedy generation of --new-tokens tokens after the same
16-token prompts, at batch 1 and batch 8, by
  (a) transformers' `generate` (do_sample=False, use_cache=True; its default attention and
      experts kernels, named in the output),
  (b) offload_rt's `generate`, local backend, every expert resident, float32,
timed in alternating rounds after one untimed warm-up each; figures are medians over rounds.
Decode tokens/s counts the steps after the first token: each engine stamps the time its
logits are ready (transformers: a `LogitsProcessor`; offload_rt: its decoder's `logits`,
wrapped for the run), and decode time is last stamp - first stamp for new_tokens - 1 steps
per row; prefill is not in it. End-to-end tokens/s (the whole `generate` call) is printed
beside it. Both engines must produce the same greedy tokens (printed).

Part 2, behind a simulated 16 GB/s link (--link-gbps): bench_offload.py's measurement on
this model, with the cache at a quarter of the experts (Qwen3: 64 of 256; DeepSeek: 32 of
128): its configurations (every expert resident, no prefetch, prefetch from attention / moe /
both — `both` is what `load` turns on — compute on a miss) in alternating repeats, and its
bound: 1 / max(the resident run's time per token, the no-prefetch run's bytes per token / 16
GB/s); `/bound` is the median over repeats of each run's ratio to its own repeat's bound.

Run from the repository root: `python3 benchmarks/bench_families.py [--family deepseek_v2]`
(about 3 minutes on 2 cores for Qwen3 once the checkpoint exists, 4 for DeepSeek; writing it,
about 5 GiB, takes under a minute more; part 1 holds both engines at once, 9-9.5 GiB);
`--quick` runs a variant with fewer experts (Qwen3: 32, DeepSeek: 16) and few tokens as a
smoke test (about 40 s). On a GPU (`--device cuda`) part 2 uses the real link.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import bench_offload
import torch
import torch.nn.functional as F
from bench_local import PROMPT_LEN, make_prompts, measure, warm_all_experts
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.utils import logging as hf_logging

import offload_rt
from offload_rt import ModelConfig, OffloadModel
from offload_rt.model import AttentionWeights, DenseMLP, MoEWeights, SwiGLU
from offload_rt.model.mla import MLAWeights
from offload_rt.models import read_config
from offload_rt.models.deepseek import DeepseekConfig

MODEL = dict(  # Qwen3-30B-A3B's shape (config.json on the hub), cut to 2 layers, vocab 32000
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=6144,  # dense MLP width: unused, every layer is an MoE layer
    moe_intermediate_size=768,
    num_hidden_layers=2,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    # no EOS: every run generates exactly its new tokens, in both engines
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    # spread logits, so greedy tokens of the two engines can be compared without near-ties
    initializer_range=0.1,
)
QUICK = dict(num_experts=32)  # --quick: 32 experts a layer (1.2 GB of experts)
DEEPSEEK_V2 = dict(  # DeepSeek-V2-Lite's shape (config.json on the hub), cut to 3 layers
    vocab_size=32000,  # cut from 102400: the lm_head and embedding of a 3-layer model
    hidden_size=2048,
    intermediate_size=10944,  # the dense first layer's MLP
    moe_intermediate_size=1408,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    q_lora_rank=None,  # V2-Lite has no query latent
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    num_attention_heads=16,
    num_key_value_heads=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,  # V2-Lite's YaRN (to 160k positions) left out
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    initializer_range=0.1,
)
BATCHES = (1, 8)
GB = 1e9


@dataclass(frozen=True)
class Family:
    """A model this benchmark builds, and transformers' classes for it."""

    name: str  # the --family value
    folder: str  # the checkpoint folder's name stem
    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
    shape: dict  # the config's fields
    quick: dict  # --quick's overrides: fewer experts
    experts_field: str  # the config field counting a layer's routed experts


QWEN3_MOE = Family(
    "qwen3_moe", "qwen3", Qwen3MoeConfig, Qwen3MoeForCausalLM, MODEL, QUICK, "num_experts"
)
DEEPSEEK = Family(
    "deepseek_v2", "deepseek-v2", DeepseekV2Config, DeepseekV2ForCausalLM, DEEPSEEK_V2,
    dict(n_routed_experts=16), "n_routed_experts",  # --quick: 1.1 GB of experts
)  # fmt: skip
FAMILIES = {f.name: f for f in (QWEN3_MOE, DEEPSEEK)}


@dataclass(frozen=True)
class Options:
    workdir: Path  # where the random checkpoint is cached
    family: Family
    model: dict  # the family's config fields (its shape, or --quick's)
    new_tokens: int  # greedy tokens per row and run (part 1)
    rounds: int  # timed rounds per engine and batch (part 1); the median is reported
    offload_steps: int  # timed decode steps per run (part 2)
    offload_repeats: int  # repeats of every configuration (part 2)
    link_gbps: float | None  # the simulated link (part 2); None: the device's real one
    device: torch.device


@dataclass(frozen=True)
class GenerateRun:
    tokens: list[list[int]]  # the new tokens per row
    seconds: float  # the whole generate call
    decode_seconds: float  # from the first token's logits to the last's


@dataclass(frozen=True)
class Replay:
    seconds: float  # best time of one batch-1 token's matrix-vector products, back to back
    nbytes: int  # the bytes of those matrices


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "offload_rt")
    p.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per run (part 1)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (part 1); median kept")
    p.add_argument("--offload-steps", type=int, default=32, help="decode steps a run (part 2)")
    p.add_argument("--offload-repeats", type=int, default=5, help="repeats (part 2)")
    p.add_argument(
        "--link-gbps", type=float, default=None, help="simulated link (default: 16 on a CPU)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--quick", action="store_true", help="fewer experts, 4 tokens, 1 round")
    a = p.parse_args()
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2: decode is timed from the first to the last")
    dev = torch.device(a.device)
    link = a.link_gbps if a.link_gbps is not None or dev.type == "cuda" else 16.0
    fam = FAMILIES[a.family]
    if a.quick:
        return Options(a.workdir, fam, {**fam.shape, **fam.quick}, 4, 1, 8, 1, link, dev)
    return Options(
        a.workdir, fam, fam.shape, a.new_tokens, a.rounds, a.offload_steps,
        a.offload_repeats, link, dev,
    )  # fmt: skip


def checkpoint(workdir: Path, model: dict, fam: Family = QWEN3_MOE) -> Path:
    """This benchmark's random checkpoint folder, written on first use (to a temporary name,
    then renamed, so an interrupted build is never reused); the model is freed after."""
    name = f"bench-{fam.folder}-{model['num_hidden_layers']}l"
    experts = model[fam.experts_field]
    if experts != fam.shape[fam.experts_field]:
        name += f"-e{experts}"
    folder = workdir / name
    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"writing a random checkpoint to {folder} ...", flush=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    hf = fam.model(fam.config(**model, dtype="float32"))
    hf.save_pretrained(partial)
    del hf
    gc.collect()
    partial.rename(folder)
    print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


class _Stamp(LogitsProcessor):
    """Records when each step's logits reach the sampling stage; changes nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def hf_runner(model: PreTrainedModel) -> Callable[[list[list[int]], int], GenerateRun]:
    def run(prompts: list[list[int]], new_tokens: int) -> GenerateRun:
        stamp = _Stamp(model.device)
        ids = torch.tensor(prompts, device=model.device)
        _sync(model.device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            logits_processor=LogitsProcessorList([stamp]),
        )
        _sync(model.device)
        seconds = time.perf_counter() - start
        tokens = out[:, ids.shape[1] :].tolist()
        return GenerateRun(tokens, seconds, stamp.stamps[-1] - stamp.stamps[0])

    return run


def ort_runner(model: OffloadModel) -> Callable[[list[list[int]], int], GenerateRun]:
    decoder = model.model

    def run(prompts: list[list[int]], new_tokens: int) -> GenerateRun:
        stamps: list[float] = []
        logits = decoder.logits

        def stamped(hidden: torch.Tensor) -> torch.Tensor:
            out = logits(hidden)
            _sync(model.device)
            stamps.append(time.perf_counter())
            return out

        decoder.logits = stamped  # this run only: stamps each step's logits, as _Stamp does
        try:
            _sync(model.device)
            start = time.perf_counter()
            results = model.generate(prompts, max_new_tokens=new_tokens)
            _sync(model.device)
            seconds = time.perf_counter() - start
        finally:
            del decoder.logits
        tokens = [r.token_ids for r in results]
        return GenerateRun(tokens, seconds, stamps[-1] - stamps[0])

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(runs: list[GenerateRun]) -> float:
    """Decode tokens/s, median over runs: rows x (new tokens - 1) / decode time."""
    return statistics.median(
        len(r.tokens) * (len(r.tokens[0]) - 1) / r.decode_seconds for r in runs
    )


def first_token_ms(runs: list[GenerateRun]) -> float:
    """Milliseconds of the generate call outside its decode span, median over runs: the
    prefill up to the first token's logits, plus the last token's argmax and the return."""
    return statistics.median(1e3 * (r.seconds - r.decode_seconds) for r in runs)


def total_rate(runs: list[GenerateRun]) -> float:
    """End-to-end tokens/s of the generate call (prefill included), median over runs."""
    return statistics.median(len(r.tokens) * len(r.tokens[0]) / r.seconds for r in runs)


def against_transformers(
    folder: Path, prompts: list[list[int]], opts: Options
) -> tuple[dict[int, dict[str, list[GenerateRun]]], Replay]:
    """transformers and offload_rt (every expert resident), alternating round by round; and
    the replay floor of one batch-1 token's products (`replay_seconds`)."""
    start = time.perf_counter()
    hf = opts.family.model.from_pretrained(folder, dtype=torch.float32).eval().to(opts.device)
    print(
        f"transformers loaded in {time.perf_counter() - start:.0f} s: attention "
        f"{hf.config._attn_implementation}, experts "
        f"{getattr(hf.config, '_experts_implementation', 'eager')}",
        flush=True,
    )
    start = time.perf_counter()
    with offload_rt.load(folder, device=opts.device, dtype="float32") as ort:
        warm_all_experts(ort)
        print(
            f"offload_rt loaded in {time.perf_counter() - start:.0f} s; both held: {memory()}",
            flush=True,
        )
        runners = {"transformers": hf_runner(hf), "offload_rt": ort_runner(ort)}
        runs = {}
        for b in BATCHES:
            # bench_local's alternating rounds, with GenerateRun for its DecodeRun
            runs[b] = measure(runners, prompts[:b], opts.new_tokens, opts.rounds)
            print(f"batch {b} done", flush=True)
        replay = replay_seconds(ort, opts.device)
    del hf
    gc.collect()
    return runs, replay


def token_matrices(ort: OffloadModel) -> list[torch.Tensor]:
    """The weight matrices one batch-1 decode token multiplies, as the runtime holds them:
    per layer its attention's and its MLP's (a dense layer's, or the router and the shared
    experts), then top-k experts' w13 and w2 per MoE layer; then lm_head.
    (bench_local.token_matrices takes two experts a layer: Mixtral's top-2.)"""
    mats = []
    for lw in ort.model.weights.layers:
        mats += attention_matrices(lw.attn)
        if isinstance(lw.mlp, MoEWeights):
            mats.append(lw.mlp.router)
            if lw.mlp.shared is not None:
                mats += [lw.mlp.shared.w13, lw.mlp.shared.w2]
        elif isinstance(lw.mlp, DenseMLP):
            mats += [lw.mlp.w13, lw.mlp.w2]
    top_k = ort.config.num_experts_per_tok
    for slot in range(top_k * len(ort.model.grid.layers)):  # any resident experts: same shapes
        ffn = ort.backend.store.weights(slot)
        assert isinstance(ffn, SwiGLU), f"float experts expected, got {type(ffn).__name__}"
        mats += [ffn.w13, ffn.w2]
    return [*mats, ort.model.weights.lm_head]


def attention_matrices(w: AttentionWeights | MLAWeights) -> list[torch.Tensor]:
    """q/k/v stacked and o; or latent attention's projections, its absorbed per-head key
    and value up-projections (H matrix-vector products) replayed as one (H N, R) product."""
    if isinstance(w, AttentionWeights):
        return [w.wqkv, w.wo]
    queries = [w.wq] if w.wq is not None else [w.wq_a, w.wq_b]
    ups = [w.w_uk.flatten(0, 1), w.w_uv.flatten(0, 1)]  # (H N, R), (H V, R)
    return [m for m in (*queries, w.wkv_a, *ups, w.wo) if m is not None]


def replay_seconds(ort: OffloadModel, device: torch.device, passes: int = 7) -> Replay:
    """Best time of a token's own matrix-vector products run back to back, nothing else:
    the floor this machine's BLAS puts under a batch-1 decode step of these weights."""
    mats = token_matrices(ort)
    xs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in mats]
    best = float("inf")
    for _ in range(passes):
        _sync(device)
        start = time.perf_counter()
        for x, w in zip(xs, mats):
            F.linear(x, w)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return Replay(best, sum(w.numel() * w.element_size() for w in mats))


def memory() -> str:
    """This process's resident memory: anonymous, and file-backed (the memory-mapped
    checkpoint's pages, which the kernel can drop)."""
    try:
        status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())
    except OSError:
        return "n/a"
    gib = {k: int(status[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile")}
    return f"{gib['RssAnon']:.1f} GiB anonymous + {gib['RssFile']:.1f} GiB file-backed"


def report_transformers(
    runs: dict[int, dict[str, list[GenerateRun]]], replay: Replay, new_tokens: int
) -> None:
    for b in BATCHES:
        tf, ort = runs[b]["transformers"], runs[b]["offload_rt"]
        same = all(r.tokens == tf[0].tokens for r in tf + ort)
        distinct = len({t for row in ort[0].tokens for t in row})
        print(
            f"batch {b}: greedy tokens of the two engines (every round) "
            f"{'identical' if same else 'DIFFER'}; {distinct} distinct tokens of "
            f"{b * new_tokens}"
        )
    print(
        f"\n{'':>5} {'decode tokens/s':^33}  {'first token ms':^19}  {'end-to-end tokens/s':^33}"
        f"\n{'batch':>5} {'transformers':>13} {'offload_rt':>11} {'ratio':>7}  "
        f"{'transformers':>12} {'ort':>6}  {'transformers':>13} {'offload_rt':>11} {'ratio':>7}"
    )
    for b in BATCHES:
        tf, ort = runs[b]["transformers"], runs[b]["offload_rt"]
        d_tf, d_ort = decode_rate(tf), decode_rate(ort)
        t_tf, t_ort = total_rate(tf), total_rate(ort)
        print(
            f"{b:>5} {d_tf:>13.2f} {d_ort:>11.2f} {d_ort / d_tf:>6.2f}x  "
            f"{first_token_ms(tf):>12.0f} {first_token_ms(ort):>6.0f}  "
            f"{t_tf:>13.2f} {t_ort:>11.2f} {t_ort / t_tf:>6.2f}x"
        )
    print(
        "(medians over rounds; decode: the steps after the first token; first token: the "
        f"generate call less its decode span, mostly the prefill of the {PROMPT_LEN}-token "
        "prompts; end-to-end: the whole generate call; ratio = offload_rt / transformers)"
    )
    for b in BATCHES:
        tf, ort = runs[b]["transformers"], runs[b]["offload_rt"]
        print(
            f"batch {b}, decode ms/step by round: transformers {_per_step(tf)}; "
            f"offload_rt {_per_step(ort)}"
        )
    floor = 1 / replay.seconds
    tf1, ort1 = decode_rate(runs[1]["transformers"]), decode_rate(runs[1]["offload_rt"])
    print(
        f"\nthe token's own matrix-vector products replayed back to back: "
        f"{replay.seconds * 1e3:.1f} ms ({replay.nbytes / 2**20:.0f} MiB at "
        f"{replay.nbytes / replay.seconds / GB:.1f} GB/s) -> replay bound {floor:.2f} tokens/s; "
        f"batch-1 decode reaches {ort1 / floor:.0%} of it (offload_rt), {tf1 / floor:.0%} "
        "(transformers)"
    )
    ratio = ort1 / tf1
    print(
        f"target offload_rt >= 1.15x transformers at batch 1 (decode): {ratio:.2f}x "
        f"-> {'met' if ratio >= 1.15 else 'NOT met'}"
    )


def _per_step(runs: list[GenerateRun]) -> str:
    return " ".join(f"{1e3 * r.decode_seconds / (len(r.tokens[0]) - 1):.1f}" for r in runs)


def behind_link(
    folder: Path, cfg: ModelConfig, prompt: list[int], opts: Options
) -> tuple[dict[str, list[bench_offload.Run]], float]:
    """bench_offload's configurations on this model with a quarter of the experts cached;
    and the link's bytes/s."""
    capacity = cfg.num_experts_total // 4
    link = bench_offload.Options(
        opts.workdir, cfg.num_hidden_layers, opts.offload_steps, opts.offload_repeats,
        opts.device, opts.link_gbps,
    )  # fmt: skip
    expert_bytes = cfg.expert_numel * 4
    bandwidth = bench_offload.link_bytes_per_s(link, expert_bytes)
    print(
        f"\nbehind the link: cache {capacity}/{cfg.num_experts_total} experts, "
        f"{'simulated' if opts.link_gbps else 'measured'} {bandwidth / GB:.1f} GB/s "
        f"({expert_bytes / bandwidth * 1e3:.2f} ms per {expert_bytes / 1e6:.1f} MB expert), "
        f"{opts.offload_steps} decode steps at batch 1, {opts.offload_repeats} repeats",
        flush=True,
    )
    return bench_offload.measure(folder, capacity, prompt, link), bandwidth


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def describe_attention(cfg: ModelConfig) -> str:
    """The heads (and for DeepSeek its latent attention, dense layers and shared experts)."""
    if not isinstance(cfg, DeepseekConfig):
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        return f"{heads} heads / {kv} KV heads of {cfg.head_dim}"
    dense = cfg.num_hidden_layers - len(cfg.moe_layers)
    return (
        f"{cfg.shared_intermediate_size // cfg.moe_intermediate_size} shared experts, "
        f"{dense} dense layer(s) of width {cfg.dense_intermediate_size}, latent attention: "
        f"{cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, q/k "
        f"{cfg.nope_dim} + rope {cfg.rope_dim}, v {cfg.v_dim}, query latent "
        f"{cfg.q_lora_rank or 'none'}"
    )


def main() -> None:
    opts = parse_options()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(
        f"{utc_now()}; CPU {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; device {opts.device}; load average "
        f"{os.getloadavg()[0]:.2f} (other work on the machine skews every figure)"
    )
    folder = checkpoint(opts.workdir, opts.model, opts.family)
    cfg = read_config(folder)
    print(
        f"model {folder}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.experts_per_layer} experts of width {cfg.moe_intermediate_size}, top-"
        f"{cfg.num_experts_per_tok}, {describe_attention(cfg)}, vocab {cfg.vocab_size}, "
        f"float32 ({cfg.num_experts_total * cfg.expert_numel * 4 / GB:.2f} GB of experts); "
        f"part 1: {opts.new_tokens} new tokens after a {PROMPT_LEN}-token prompt, "
        f"{opts.rounds} rounds",
        flush=True,
    )
    prompts = make_prompts(max(BATCHES), cfg.vocab_size)

    runs, replay = against_transformers(folder, prompts, opts)
    print(f"load average {os.getloadavg()[0]:.2f} after part 1")
    report_transformers(runs, replay, opts.new_tokens)

    offload, bandwidth = behind_link(folder, cfg, prompts[0], opts)
    print(f"load average {os.getloadavg()[0]:.2f} after part 2")
    bench_offload.check_tokens(offload)
    bench_offload.report(offload, bandwidth, cfg.expert_numel * 4)
    hits = bench_offload.per_token(offload["no prefetch"], "hits")
    misses = bench_offload.per_token(offload["no prefetch"], "misses")
    print(
        f"no prefetch (LRU alone): {hits:.2f} hits, {misses:.2f} misses per token, of "
        f"{cfg.num_experts_per_tok * len(cfg.moe_layers)} expert uses (median over repeats)"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{utc_now()}; peak resident memory {peak:.1f} GiB (file-backed pages included)")


if __name__ == "__main__":
    main()
