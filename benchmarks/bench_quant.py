"""Quantized experts against float32: bytes per expert, logits error, greedy agreement, speed.

For fp32 (the baseline) and its int8, int4 and MXFP4 copies written by `quantize_checkpoint`
(int8/int4: group-wise affine codes; MXFP4: e2m1 codes with a power-of-two scale per 32
weights, as GPT-OSS's experts are released), prints side by side:
  - bytes of one packed expert, and its ratio to the float32 expert and to a 16-bit one
    (scales and offsets included);
  - the logits error: each prompt decoded greedily by fp32 for --new tokens, then every variant
    decoded along the same tokens (teacher-forced), max |logits - fp32 logits| over all steps;
  - greedy agreement: each variant's own greedy tokens against fp32's, how many prompts agree
    on all --new tokens, and per prompt where they first part and why (fp32's top-2 logit gap
    at that step, and whether the variant routed that step's token to other experts);
  - batch-1 decode tokens/s (median of --repeats, the variants alternating run by run) with
    every expert resident, and with `cache_experts` a quarter of the experts behind a simulated
    --link-gbps host->device link (the offloading case: misses move the packed bytes).

The model (--family): bench_local.py's random Mixtral checkpoint (`mixtral`, the default:
hidden 1024, intermediate 2816, 8 layers, 8 experts, top-2, fp32), or bench_families.py's
random Qwen3-30B-A3B-shaped one with 32 experts a layer, cut to 4 layers (`qwen3_moe`: hidden
2048, 32 experts of width 768, top-8, fp32; 2.4 GB of experts, about the Mixtral one's 2.2),
written into --workdir on first use and reused; or any float checkpoint given with
--checkpoint. Run from the repository root: `python benchmarks/bench_quant.py [--family
qwen3_moe]` (15-20 minutes on 2 cores, the first run quantizing the checkpoint three times);
`--quick` runs a 2-layer model with fewer prompts and steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import bench_families
import bench_local
import torch

import offload_rt
from offload_rt import OffloadModel
from offload_rt.checkpoint import Checkpoint
from offload_rt.config import DEFAULT_GROUP_SIZE, ModelConfig, QuantConfig
from offload_rt.engine import BatchDecoder
from offload_rt.experts.mxfp4 import dequantize_mxfp4_new
from offload_rt.experts.quant import QuantizedTensor, dequantize
from offload_rt.model.ffn import SwiGLU
from offload_rt.models import open_checkpoint, read_config
from offload_rt.tools.quantize import FORMATS, quantize_checkpoint

VARIANTS = ("fp32", "int8", "int4", "mxfp4")
# --family: the random checkpoint's builder, and its decoder layers (--quick: 2)
FAMILY_LAYERS = {"mixtral": bench_local.MODEL["num_hidden_layers"], "qwen3_moe": 4}


@dataclass(frozen=True)
class Options:
    folder: Path | None  # a float checkpoint given by the user; None: --family's random one
    workdir: Path  # where checkpoints are cached
    family: str  # which random checkpoint (FAMILY_LAYERS)
    layers: int  # of the random checkpoint
    group_size: int  # quantization group
    prompts: int  # prompts for accuracy
    token_ids: list[list[int]] | None  # given prompts instead of random ones
    new: int  # greedy tokens per prompt
    steps: int  # timed decode steps per run
    repeats: int  # timed runs per variant
    link_gbps: float  # simulated link of the capped-cache runs (on a CPU device)
    device: torch.device  # where every variant runs


@dataclass
class Decode:
    tokens: list[int]  # greedy (or forced) tokens
    logits: torch.Tensor  # (steps, V): the logits each token was chosen from
    routing: tuple  # per forward pass: per layer, the experts used


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--checkpoint", type=Path, default=None, help="a float checkpoint folder")
    p.add_argument("--family", choices=list(FAMILY_LAYERS), default="mixtral", help="random model")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=32, help="greedy tokens compared per prompt")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--link-gbps", type=float, default=16.0)
    p.add_argument("--quick", action="store_true", help="2 layers, 3 prompts, 8 steps, 1 repeat")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (cuda: the real link)")
    p.add_argument(
        "--token-ids",
        action="append",
        default=None,
        help="a prompt as comma-separated ids (repeat for more) instead of random prompts",
    )
    a = p.parse_args()
    dev = torch.device(a.device)
    ids = None if a.token_ids is None else [[int(t) for t in p.split(",")] for p in a.token_ids]
    if a.quick:
        n = 3 if ids is None else len(ids)
        return Options(
            a.checkpoint, a.workdir, a.family, 2, a.group_size, n, ids, a.new, 8, 1,
            a.link_gbps, dev,
        )  # fmt: skip
    prompts = a.prompts if ids is None else len(ids)
    return Options(
        a.checkpoint,
        a.workdir,
        a.family,
        FAMILY_LAYERS[a.family],
        a.group_size,
        prompts,
        ids,
        a.new,
        a.steps,
        a.repeats,
        a.link_gbps,
        dev,
    )


def float_checkpoint(opts: Options) -> Path:
    """The float checkpoint: the user's, or --family's random one (written on first use)."""
    if opts.folder is not None:
        return opts.folder
    if opts.family == "qwen3_moe":  # bench_families' model with its --quick's 32 experts
        model = {**bench_families.MODEL, **bench_families.QUICK, "num_hidden_layers": opts.layers}
        return bench_families.checkpoint(opts.workdir, model)
    return bench_local.checkpoint(opts.workdir, opts.layers)


def quantized(folder: Path, workdir: Path, name: str, group: int) -> Path:
    """The int8 / int4 / mxfp4 copy of `folder`, written on first use and reused after."""
    bits, scheme = FORMATS[name]
    out = workdir / (
        f"{folder.name}-mxfp4" if scheme == "mxfp4" else f"{folder.name}-{name}-g{group}"
    )
    if (out / "config.json").is_file():
        return out
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    report = quantize_checkpoint(folder, out, bits, group, progress=False, scheme=scheme)
    print(
        f"quantized to {name} in {time.perf_counter() - start:.1f} s: weight error max "
        f"{report.max_abs_error:.3g}, relative RMS {report.relative_rms_error:.4f}",
        flush=True,
    )
    return out


def decode(model: OffloadModel, prompt: list[int], n: int, forced: list[int] | None) -> Decode:
    """Batch-1 greedy decode of n tokens (never stopping at EOS), or along `forced` tokens;
    the model loaded with `record_routing=True`, whose passes of this decode it returns."""
    before = len(model.routing_trace().passes)
    decoder = BatchDecoder(model.model, [prompt], len(prompt) + n)
    logits = [decoder.prefill()[0]]
    tokens = []
    for i in range(n):
        tokens.append(int(logits[-1].argmax()) if forced is None else forced[i])
        if i + 1 < n:
            logits.append(decoder.step([tokens[-1]], [True])[0])
    return Decode(tokens, torch.stack(logits), model.routing_trace().passes[before:])


def accuracy(
    folders: dict[str, Path], prompts: list[list[int]], n: int, device: torch.device
) -> dict[str, dict]:
    """Per variant: max logits error, fp32 logits' std, prompts in full agreement, partings.
    "bf16" is the fp32 checkpoint run wholly in bfloat16: the error of a precision in common
    use, for scale."""
    with offload_rt.load(folders["fp32"], device=device, record_routing=True) as m:
        base = [decode(m, p, n, None) for p in prompts]
    spread = statistics.mean(float(d.logits.std()) for d in base)
    out = {"fp32": {"err": 0.0, "spread": spread, "agree": len(prompts), "parts": []}}
    others = [(name, folders[name], None) for name in VARIANTS[1:]]
    for name, folder, dtype in [*others, ("bf16", folders["fp32"], "bfloat16")]:
        with offload_rt.load(folder, device=device, dtype=dtype, record_routing=True) as m:
            forced = [decode(m, p, n, b.tokens) for p, b in zip(prompts, base)]
            free = [decode(m, p, n, None) for p in prompts]
        err = max(float((f.logits.float() - b.logits).abs().max()) for f, b in zip(forced, base))
        parts = [part_of(b, f, g) for b, f, g in zip(base, forced, free)]
        agree = sum(p is None for p in parts)
        out[name] = {"err": err, "spread": spread, "agree": agree, "parts": parts}
    return out


def part_of(base: Decode, forced: Decode, free: Decode) -> tuple | None:
    """Where `free` first parts from `base`: (step, fp32's top-2 gap there, the variant's logits
    error there, whether it routed that step to other experts); None if it never does."""
    i = next((i for i, (a, b) in enumerate(zip(base.tokens, free.tokens)) if a != b), None)
    if i is None:
        return None
    top2 = base.logits[i].topk(2).values
    err = float((forced.logits[i].float() - base.logits[i]).abs().max())
    return i, float(top2[0] - top2[1]), err, base.routing[i] != forced.routing[i]


def expert_output_error(folders: dict[str, Path], tokens: int = 16) -> dict[str, float]:
    """Relative RMS error of every expert's output against fp32's on the same random input
    (rows of unit RMS, as the post-attention RMSNorm hands them over): the quantization error
    of one expert, before the layers compound it. "bf16": fp32 weights rounded to bfloat16."""
    fp = open_checkpoint(folders["fp32"])
    quantized = {name: open_checkpoint(folders[name]) for name in VARIANTS[1:]}
    cfg, gen = fp.config, torch.Generator().manual_seed(0)
    sq = {name: 0.0 for name in (*VARIANTS[1:], "bf16")}
    ref_sq = 0.0
    for layer, expert in cfg.grid.keys():
        x = torch.randn(tokens, cfg.hidden_size, generator=gen)
        w = {k: v.float() for k, v in fp.expert(layer, expert).items()}
        ref = ffn(x, w)
        ref_sq += float(ref.square().sum())
        sq["bf16"] += float(
            (ffn(x, {k: v.bfloat16().float() for k, v in w.items()}) - ref).square().sum()
        )
        for name, ckpt in quantized.items():
            sq[name] += float((ffn(x, dequantized(ckpt, layer, expert)) - ref).square().sum())
    return {name: (e / ref_sq) ** 0.5 for name, e in sq.items()}


def ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert from its logical parts: gate, up, down."""
    return SwiGLU(torch.cat([w["gate"], w["up"]]), w["down"])(x)


def dequantized(ckpt: Checkpoint, layer: int, expert: int) -> dict[str, torch.Tensor]:
    parts, quant = ckpt.expert(layer, expert), ckpt.config.quantization
    assert quant is not None
    if quant.scheme == "mxfp4":
        return {
            proj: dequantize_mxfp4_new(
                parts[f"{proj}.blocks"], parts[f"{proj}.scales"], torch.float32
            )
            for proj in ("gate", "up", "down")
        }
    return {
        proj: dequantize(
            QuantizedTensor(*(parts[f"{proj}.{p}"] for p in ("qweight", "scales", "offsets"))),
            quant,
        )
        for proj in ("gate", "up", "down")
    }


def decode_seconds(model: OffloadModel, prompt: list[int], steps: int) -> tuple[float, dict]:
    """Wall time of `steps` batch-1 greedy decode steps (prefill untimed), and the counters
    gained over them."""
    decoder = BatchDecoder(model.model, [prompt], len(prompt) + steps + 1)
    logits = decoder.prefill()
    before = model.stats()
    start = time.perf_counter()
    for _ in range(steps):
        logits = decoder.step([int(logits[0].argmax())], [True])
    seconds = time.perf_counter() - start
    after = model.stats()
    return seconds, {k: after[k] - before[k] for k in ("misses", "bytes_loaded")}


def speed(
    folders: dict[str, Path], prompt: list[int], opts: Options, **load: object
) -> dict[str, tuple[float, float]]:
    """Median tokens/s per variant and bytes moved per decode token; runs alternate."""
    models = {
        name: offload_rt.load(folder, device=opts.device, **load)
        for name, folder in folders.items()
    }
    try:
        for m in models.values():
            m.warm()
            decode_seconds(m, prompt, min(4, opts.steps))
        runs: dict[str, list] = {name: [] for name in models}
        for _ in range(opts.repeats):
            for name, m in models.items():
                runs[name].append(decode_seconds(m, prompt, opts.steps))
    finally:
        for m in models.values():
            m.close()
    return {
        name: (
            statistics.median(opts.steps / s for s, _ in r),
            statistics.mean(g["bytes_loaded"] for _, g in r) / opts.steps,
        )
        for name, r in runs.items()
    }


def expert_bytes(folders: dict[str, Path]) -> dict[str, int]:
    out = {}
    for name, folder in folders.items():
        with offload_rt.load(folder, cache_experts=1) as m:
            out[name] = m.backend.store.nbytes
    return out


def report(
    cfg: ModelConfig,
    nbytes: dict,
    expert_err: dict,
    acc: dict,
    resident: dict,
    capped: dict,
    opts: Options,
) -> None:
    cached = f"{cfg.num_experts_total // 4}/{cfg.num_experts_total}"
    head = ["", "bytes/expert", "/fp32", "/16-bit", "expert err", "max|dlogit|", "/std"]
    head += ["greedy ="]
    head += ["tok/s all", f"tok/s {cached}", "MB/token"]
    rows = [head]
    for name in VARIANTS:
        a, ratio = acc[name], nbytes[name] / nbytes["fp32"]
        rows.append(
            [name, str(nbytes[name]), f"{ratio:.4f}", f"{2 * ratio:.4f}"]
            + [f"{expert_err.get(name, 0.0):.5f}", f"{a['err']:.4f}"]
            + [f"{a['err'] / a['spread']:.3f}", f"{a['agree']}/{opts.prompts}"]
            + [f"{resident[name][0]:.2f}", f"{capped[name][0]:.2f}", f"{capped[name][1] / 1e6:.2f}"]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    bf16 = acc["bf16"]
    print(
        f"for scale, fp32 weights rounded to bfloat16: expert err {expert_err['bf16']:.5f}; "
        f"the fp32 model run wholly in bfloat16: max|dlogit| {bf16['err']:.4f} "
        f"(/std {bf16['err'] / bf16['spread']:.3f}), greedy = {bf16['agree']}/{opts.prompts}"
    )
    print(
        f"(bytes/expert: one packed expert, scales and offsets included; /16-bit: against the "
        f"same expert in bfloat16; expert err: relative RMS error of each expert's output on "
        f"random unit-RMS rows; max|dlogit|: over {opts.prompts} prompts x {opts.new} steps "
        f"teacher-forced on fp32's tokens; /std: over the fp32 logits' std; greedy =: prompts "
        f"whose {opts.new} greedy tokens all equal fp32's; tok/s: batch-1 decode, median of "
        f"{opts.repeats}, every expert resident / {cached} cached behind a {opts.link_gbps:g} "
        "GB/s simulated link; MB/token: bytes moved per decode token in the capped runs)"
    )
    for name in (*VARIANTS[1:], "bf16"):
        for i, part in enumerate(acc[name]["parts"]):
            if part is not None:
                step, gap, err, flipped = part
                why = "differs (an expert choice flipped)" if flipped else "the same"
                print(
                    f"{name} prompt {i}: parts from fp32 at step {step}: fp32 top-2 gap "
                    f"{gap:.4f}, {name} logits error there {err:.4f}, routing {why}"
                )


def main() -> None:
    opts = parse_options()
    if opts.device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(opts.device)} (capped runs: the real link)")
    print(
        f"{bench_families.utc_now()}; CPU {bench_families.cpu_model()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.2f} (other work on the machine skews the tokens/s figures)",
        flush=True,
    )
    folder = float_checkpoint(opts)
    cfg = read_config(folder)
    folders = {"fp32": folder}
    for name in VARIANTS[1:]:
        folders[name] = quantized(folder, opts.workdir, name, opts.group_size)
    print(
        f"model {folder} ({cfg.model_type}: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.experts_per_layer} experts of width "
        f"{cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}): int8/int4 in groups of "
        f"{QuantConfig(8, opts.group_size).group_size}, mxfp4 in groups of 32",
        flush=True,
    )
    prompts = opts.token_ids or bench_local.make_prompts(opts.prompts, cfg.vocab_size)
    nbytes = expert_bytes(folders)
    expert_err = expert_output_error(folders)
    acc = accuracy(folders, prompts, opts.new, opts.device)
    resident = speed(folders, prompts[0], opts)
    capped = speed(
        folders,
        prompts[0],
        opts,
        cache_experts=cfg.num_experts_total // 4,
        link_gbps=opts.link_gbps if opts.device.type == "cpu" else None,
    )
    report(cfg, nbytes, expert_err, acc, resident, capped, opts)
    print(f"{bench_families.utc_now()}; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
