"""CPU decode at batch 1: offload_rt against llama.cpp on the same checkpoint and thread count.

The model is bench_local's random Mixtral (hidden 1024, intermediate 2816, 8 layers, 8 experts,
top-2, vocab 32000), written once into --workdir; its int8 and int4 copies are bench_quant's
(group 64). llama.cpp runs from a build of its source (`--llama-cpp`, the tree holding
`convert_hf_to_gguf.py` and `build/bin/llama-bench`; the build steps are in docs/benchmarks.md,
"CPU decode against llama.cpp"): its own converter makes f32, bf16 and f16 GGUFs of the
checkpoint, and `llama-quantize` q8_0 and q4_0 ones from the f32 file. The converter wants a
tokenizer it knows, so a small sentencepiece `tokenizer.model` is trained for it (token ids
above its vocabulary become padding entries; decode speed does not depend on them).

Each round times, for every weight format in turn, `llama-bench -p 0 -n N` (N tokens generated
after no prompt) and offload_rt generating N tokens greedily after a one-token prompt (the
runtime's own compiled CPU kernels, and the same with them off: `OFFLOAD_RT_CPU_KERNELS=0`),
so background load hits all alike; the medians over rounds are reported with their ratio and
the median of each round's own ratio (the host's memory speed shifts by up to 1.5x for tens of
seconds at a time; a round's two runs lie seconds apart), the CPU's model name and the load
average of each round.

Pairs: float32, bfloat16 and float16 models against llama.cpp's f32, bf16 and f16 GGUFs;
offload_rt's int8 / int4 experts against q8_0 / q4_0, with attention and lm_head quantized to
int8 / int4 as well (`dense_quant`; llama.cpp's q8_0 file holds them in q8_0, its q4_0 file in
q4_0 but lm_head in q6_K, so the int4 rows hold lm_head in int8, `lm_head_quant`: at least as
precise, 1.3x q6_K's bytes; --int4-lm-head for int4), activations in --quant-dtype; and the
int4 copy once more with
bfloat16 activations (the int4 x bfloat16 kernel of `offload_rt/model/packed.py` on CPUs with
AVX-512 BF16), against the same q4_0 file.

Run from the repository root: `python benchmarks/bench_cpu.py` (about 10 minutes on 2 cores the
first time, converting and compiling; 4-5 after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bench_local
import bench_quant
import torch
from bench_families import cpu_model

import offload_rt
from offload_rt import OffloadModel
from offload_rt.dtypes import DTYPES
from offload_rt.model import cpukernels

LLAMA_CPP = Path.home() / ".cache/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
GROUP = 64


@dataclass(frozen=True)
class Pair:
    name: str  # the row's label
    ours: str  # "float32", "bfloat16", "float16", "int8", "int4", "int4-bf16"
    gguf: str  # llama.cpp's type: f32, bf16, f16, q8_0, q4_0


PAIRS = [
    Pair("float32", "float32", "f32"),
    Pair("bfloat16", "bfloat16", "bf16"),
    Pair("float16", "float16", "f16"),
    Pair("8-bit (q8_0 / int8 experts)", "int8", "q8_0"),
    Pair("4-bit (q4_0 / int4 experts)", "int4", "q4_0"),
    # the same int4 checkpoint with bfloat16 activations: model/packed.py's kernel on AVX-512 BF16
    Pair("4-bit, bfloat16 activations (q4_0 / int4)", "int4-bf16", "q4_0"),
]


@dataclass(frozen=True)
class Options:
    workdir: Path
    llama_cpp: Path
    threads: int
    tokens: int  # generated per timed run
    rounds: int
    quant_dtype: torch.dtype  # offload_rt's activations (and float weights) with int8/int4 experts
    dense_quant: bool  # with int8/int4 experts, attention and lm_head quantized alike
    pairs: list[Pair]
    int4_lm_head: bool = False  # with int4 experts, lm_head in int4 (else int8)


def parse_options() -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/offload_rt_bench"))
    p.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="llama.cpp source tree")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per timed run")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians reported")
    p.add_argument("--quant-dtype", default="float32", help="compute dtype with int8/int4 experts")
    p.add_argument(
        "--dense-quant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize attention and lm_head as the experts (llama.cpp quantizes them too)",
    )
    p.add_argument("--only", nargs="*", default=None, help="rows by offload_rt format")
    p.add_argument(
        "--int4-lm-head",
        action="store_true",
        help="with int4 experts, lm_head in int4 too (llama.cpp's q4_0 keeps it in q6_K)",
    )
    a = p.parse_args()
    pairs = [x for x in PAIRS if a.only is None or x.ours in a.only]
    for tool in ("build/bin/llama-bench", "build/bin/llama-quantize", "convert_hf_to_gguf.py"):
        if not (a.llama_cpp / tool).is_file():
            sys.exit(f"{a.llama_cpp / tool} is missing: build llama.cpp as docs/benchmarks.md says")
    return Options(
        a.workdir,
        a.llama_cpp,
        a.threads,
        a.tokens,
        a.rounds,
        DTYPES[a.quant_dtype],
        a.dense_quant,
        pairs,
        a.int4_lm_head,
    )


def sentencepiece_model(out: Path, vocab: int = 2000) -> Path:
    """A llama-style sentencepiece tokenizer.model, trained on generated words."""
    import random

    import sentencepiece as spm

    path = out / "tokenizer.model"
    if path.is_file():
        return path
    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    words = ["".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(5000)]
    text = out / "spm.txt"
    text.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(20000)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=vocab,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
    )  # fmt: skip
    return path


def gguf_files(folder: Path, opts: Options) -> dict[str, Path]:
    """llama.cpp's f32, bf16, f16, q8_0 and q4_0 GGUFs of `folder`, made on first use."""
    out = opts.workdir / f"{folder.name}-gguf"
    out.mkdir(exist_ok=True)
    src = out / "hf"
    src.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.suffix in (".json", ".safetensors") and not (src / f.name).exists():
            (src / f.name).symlink_to(f.resolve())
    sentencepiece_model(src)
    files = {}
    for kind in ("f32", "bf16", "f16"):
        files[kind] = out / f"model-{kind}.gguf"
        if not files[kind].is_file():
            convert = [sys.executable, str(opts.llama_cpp / "convert_hf_to_gguf.py"), str(src)]
            run(convert + ["--outtype", kind, "--outfile", str(files[kind])])
    for kind in ("q8_0", "q4_0"):
        files[kind] = out / f"model-{kind}.gguf"
        if not files[kind].is_file():
            quantize = opts.llama_cpp / "build/bin/llama-quantize"
            run([str(quantize), str(files["f32"]), str(files[kind]), kind.upper()])
    return files


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def llama_tokens_per_s(gguf: Path, opts: Options) -> float:
    bench = opts.llama_cpp / "build/bin/llama-bench"
    cmd = [str(bench), "-m", str(gguf), "-p", "0", "-n", str(opts.tokens)]
    out = run(cmd + ["-t", str(opts.threads), "-r", "1", "-o", "json"])
    return float(json.loads(out)[0]["avg_ts"])


def ours_tokens_per_s(model: OffloadModel, opts: Options, kernels: bool) -> float:
    os.environ[cpukernels.ENV] = "1" if kernels else "0"
    start = time.perf_counter()
    model.generate([1], max_new_tokens=opts.tokens, stop=[])
    return opts.tokens / (time.perf_counter() - start)


def load_ours(pair: Pair, folder: Path, opts: Options) -> OffloadModel:
    if pair.ours.startswith("int"):
        bits = pair.ours[:4]
        q = bench_quant.quantized(folder, opts.workdir, bits, GROUP)
        dense = bits if opts.dense_quant else None
        head = "int8" if dense == "int4" and not opts.int4_lm_head else None
        dtype = torch.bfloat16 if pair.ours.endswith("-bf16") else opts.quant_dtype
        model = offload_rt.load(q, dtype=dtype, dense_quant=dense, lm_head_quant=head)
    else:
        model = offload_rt.load(folder, dtype=DTYPES[pair.ours])
    for kernels in (True, False):  # compile the kernels, fault in the weights
        ours_tokens_per_s(model, opts, kernels)
    return model


def main() -> None:
    opts = parse_options()
    torch.set_num_threads(opts.threads)
    folder = bench_local.checkpoint(opts.workdir, bench_local.MODEL["num_hidden_layers"])
    files = gguf_files(folder, opts)
    print(f"CPU: {cpu_model()}, {opts.threads} threads, torch {torch.__version__}", flush=True)
    models = {p.ours: load_ours(p, folder, opts) for p in opts.pairs}
    got: dict[str, dict[str, list[float]]] = {p.ours: {} for p in opts.pairs}
    for r in range(opts.rounds):
        for p in opts.pairs:
            row = got[p.ours]
            row.setdefault("llama", []).append(llama_tokens_per_s(files[p.gguf], opts))
            row.setdefault("ours", []).append(ours_tokens_per_s(models[p.ours], opts, True))
            row.setdefault("eager", []).append(ours_tokens_per_s(models[p.ours], opts, False))
            print(f"  {p.ours}: llama.cpp {row['llama'][-1]:.1f}, offload_rt {row['ours'][-1]:.1f}")
        print(f"round {r + 1}/{opts.rounds} done, load average {os.getloadavg()}", flush=True)
    report(opts, got)
    for m in models.values():
        m.close()


def report(opts: Options, got: dict[str, dict[str, list[float]]]) -> None:
    med = {k: {e: statistics.median(v) for e, v in row.items()} for k, row in got.items()}
    print(f"\nbatch-1 greedy decode, tokens/s, medians of {opts.rounds} alternating rounds")
    print("(paired: the median of the rounds' own ratios, each round's two runs seconds apart)")
    print("| weights | llama.cpp | offload_rt | ratio | paired | offload_rt, kernels off | ratio |")
    print("|---|---|---|---|---|---|---|")
    for p in opts.pairs:
        m, row = med[p.ours], got[p.ours]
        paired = statistics.median(o / ll for o, ll in zip(row["ours"], row["llama"]))
        print(
            f"| {p.name} | {m['llama']:.1f} | {m['ours']:.1f} | {m['ours'] / m['llama']:.2f}x "
            f"| {paired:.2f}x | {m['eager']:.1f} | {m['eager'] / m['llama']:.2f}x |"
        )
    for q in ("int8", "int4", "int4-bf16"):
        if q in med and "float32" in med:
            speedup = med[q]["ours"] / med["float32"]["ours"]
            print(f"offload_rt {q} experts against float32 ones: {speedup:.2f}x")


if __name__ == "__main__":
    main()
