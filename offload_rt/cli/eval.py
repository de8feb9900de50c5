"""`offload-rt eval`: perplexity over a text, and another model or expert format against it.

    offload-rt eval MODEL (--text FILE | --token-ids FILE) [--window N]
                    [--against OTHER_MODEL | int8 | int4 | mxfp4]

`--against` takes a checkpoint folder or hub id (e.g. a quantized copy), or the name of an
expert format: MODEL is then quantized to it into a temporary folder first. A folder of that
name always wins. The computation is `offload_rt.engine.evaluate`.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload_rt.cli.options import add_model_argument, add_model_options, load_model, model_folder
from offload_rt.config import DEFAULT_GROUP_SIZE
from offload_rt.engine import OffloadModel
from offload_rt.engine.evaluate import EvalReport, evaluate
from offload_rt.tools.quantize import FORMATS, quantize_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity over a text; KL and top-1 agreement --against")
    add_model_argument(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="UTF-8 text file, tokenized by MODEL's tokenizer")
    source.add_argument(
        "--token-ids", type=Path, help="file of token ids separated by spaces, commas or lines"
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens per window; each window's first token is context only (default: the "
        "model's context or 512, whichever is smaller)",
    )
    p.add_argument(
        "--against",
        default=None,
        help=f"another checkpoint folder or hub id, or an expert format ({', '.join(FORMATS)}) "
        "to quantize MODEL to: KL(MODEL || OTHER) and top-1 agreement token by token",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help="--against int8|int4: input columns per scale, as `quantize` (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_options(p, cache_experts=None)


def run(args: argparse.Namespace) -> int:
    """Run `eval`; bad input raises ValueError naming the file or option at fault."""
    path = args.text if args.text is not None else args.token_ids
    content = read_source(path)  # before loading: a typo should not wait for the weights
    folder = model_folder(args.model_dir)
    with load_model(args, folder) as model:
        ids = to_tokens(model, content, path, tokenized=args.token_ids is not None)
        if len(ids) < 2:
            raise ValueError(f"{path} gives {len(ids)} token(s); perplexity needs at least 2")
        if args.against is None:
            report = evaluate(model, ids, args.window, progress=not args.no_progress)
        else:
            with (
                other_folder(
                    args.against, folder, args.group_size, not args.no_progress
                ) as other_dir,
                load_model(args, other_dir) as other,
            ):
                report = evaluate(model, ids, args.window, other, not args.no_progress)
    print(format_report(report, args.against))
    return 0


def read_source(path: Path) -> str:
    """The contents of --text or --token-ids: a file that exists and is not blank."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    content = path.read_text(encoding="utf-8")
    if not content.strip():
        raise ValueError(f"{path} is empty")
    return content


def to_tokens(model: OffloadModel, content: str, path: Path, tokenized: bool) -> list[int]:
    """The ids to evaluate: `content` through the model's tokenizer, or ids as written."""
    if tokenized:
        try:
            return [int(t) for t in re.split(r"[\s,]+", content.strip())]
        except ValueError as e:
            raise ValueError(f"{path}: token ids must be integers ({e})") from e
    if model.tokenizer is None:
        raise ValueError(
            f"{model.checkpoint.folder} has no tokenizer.json to tokenize {path}: "
            "give --token-ids instead"
        )
    return model.tokenizer.encode(content)


@contextmanager
def other_folder(
    against: str, model_dir: Path, group_size: int = DEFAULT_GROUP_SIZE, progress: bool = True
) -> Iterator[Path]:
    """The folder of --against: itself when it exists or is not a format name, else MODEL
    quantized to that format in a temporary folder, removed afterwards."""
    if Path(against).exists() or against not in FORMATS:
        yield model_folder(against)
        return
    bits, scheme = FORMATS[against]
    group = 32 if scheme == "mxfp4" else group_size
    with tempfile.TemporaryDirectory(prefix=f"offload_rt_eval_{against}_") as tmp:
        out = Path(tmp) / against
        quantize_checkpoint(model_dir, out, bits, group, progress=progress, scheme=scheme)
        yield out


def format_report(report: EvalReport, against: str | None) -> str:
    lines = [
        f"windows: {report.windows} of up to {report.window} tokens; {report.scored} tokens "
        "scored (each window's first token is context only)",
        f"perplexity: {report.perplexity:.4f} (mean NLL {report.mean_nll:.6f} nats)",
        f"time: {report.seconds:.2f} s, {report.tokens_per_second:.1f} tok/s"
        + (" (both models)" if against is not None else ""),
    ]
    c = report.against
    if c is not None:
        lines += [
            f"against {against}: perplexity {c.perplexity:.4f} "
            f"(ratio {c.perplexity / report.perplexity:.6f})",
            f"KL(model || {against}) per token, nats: mean {c.kl_mean:.6g}, "
            f"99th percentile {c.kl_p99:.6g}, max {c.kl_max:.6g}",
            f"top-1 agreement: {c.top1_agreement:.6f} ({100 * c.top1_agreement:.2f}% of tokens)",
        ]
    return "\n".join(lines)
