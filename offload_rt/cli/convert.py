"""`offload-rt convert`: the original Mixtral release into the Hugging Face layout.

    offload-rt convert SRC OUT [--dtype bfloat16] [--max-shard-gb 2] [--no-progress]

SRC holds the release's consolidated.00.pth (or several consolidated.NN.pth), params.json
and tokenizer.model; OUT (new, or an empty folder) gets what `offload_rt.load` reads.
`offload_rt.convert` gives the rules.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offload_rt.config import DTYPE_NAMES
from offload_rt.convert import DEFAULT_SHARD_BYTES, convert_checkpoint

GB = 10**9


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert` on the `offload-rt` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert the original Mixtral release (consolidated.00.pth, params.json, "
        "tokenizer.model) into a Hugging Face safetensors folder",
    )
    p.add_argument("src", type=Path, help="folder of the original release")
    p.add_argument("out", type=Path, help="new folder for the converted checkpoint")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPE_NAMES),
        help="dtype of the written tensors (default: the source's)",
    )
    p.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_SHARD_BYTES / GB,
        help="largest safetensors shard, in GB; about the RAM the conversion needs "
        "(default: %(default).2f)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `convert`; bad input raises ConvertError (a ValueError) naming the fault."""
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    report = convert_checkpoint(
        args.src,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * GB),
        progress=not args.no_progress,
    )
    for note in report.notes:
        print(f"note: {note}")
    tokenizer = "tokenizer.json" if report.tokenizer_json else "no tokenizer.json"
    print(
        f"converted {report.tensors} tensors ({report.bytes_written / GB:.2f} GB, "
        f"{report.dtype}, {tokenizer}) -> {report.out}"
    )
    return 0
