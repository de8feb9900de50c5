"""`offload-rt quantize`: write a copy of a checkpoint with int8, int4 or MXFP4 experts.

    offload-rt quantize MODEL_DIR OUT_DIR --format int8|int4|mxfp4 [--group-size G]
                        [--max-shard-gb S]

(`--bits 8|4` is `--format int8|int4`.) `offload_rt.load(OUT_DIR)` reads the result;
`offload_rt/experts/quant.py` and `mxfp4.py` give the formats.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from offload_rt.cli.convert import GB
from offload_rt.cli.options import add_model_argument, model_folder
from offload_rt.config import DEFAULT_GROUP_SIZE, QUANT_BITS
from offload_rt.tools.quantize import DEFAULT_SHARD_BYTES, FORMATS, quantize_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `quantize` on the `offload-rt` subcommands; returns its parser."""
    p = subparsers.add_parser(
        "quantize", help="write a checkpoint with int8, int4 or MXFP4 experts"
    )
    add_model_argument(p)
    p.add_argument("out_dir", type=Path, help="new folder for the quantized checkpoint")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--format", choices=list(FORMATS), help="expert weight format")
    kind.add_argument("--bits", type=int, choices=list(QUANT_BITS), help="--format int8|int4")
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help="int8/int4: input columns per scale and offset; must divide hidden and "
        "intermediate sizes (default: %(default)s; MXFP4's groups are 32)",
    )
    p.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_SHARD_BYTES / GB,
        help="largest safetensors file in GB (10^9 bytes, as `convert`) (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run `quantize`; bad input raises ValueError (CheckpointError, ConfigError) naming it."""
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    name = args.format or f"int{args.bits}"
    bits, scheme = FORMATS[name]
    group = 32 if scheme == "mxfp4" else args.group_size
    start = time.perf_counter()
    report = quantize_checkpoint(
        model_folder(args.model_dir),
        args.out_dir,
        bits,
        group,
        max_shard_bytes=int(args.max_shard_gb * GB),
        progress=not args.no_progress,
        scheme=scheme,
    )
    ratio = report.quant_nbytes / report.float_nbytes
    print(
        f"{report.experts} experts quantized to {name} (groups of {group}) "
        f"in {time.perf_counter() - start:.1f} s -> {report.folder}"
    )
    print(
        f"bytes per expert: {report.float_nbytes} as stored -> {report.quant_nbytes} "
        f"({ratio:.4f}, scales and offsets included)"
    )
    print(
        f"weight error: max |W - W_q| {report.max_abs_error:.3g}, "
        f"relative RMS {report.relative_rms_error:.3g}"
    )
    return 0
