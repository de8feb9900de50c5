"""Writing a quantized checkpoint (`offload-rt quantize MODEL OUT --format int8|int4|mxfp4`).

Every tensor but the expert weights is copied as stored. Each expert projection's `weight` is
replaced by its `qweight`, `scales` and `offsets` (int8/int4: `experts/quant.py`) or by its
`blocks` and `scales` (MXFP4: `experts/mxfp4.py`), and config.json gains a
`quantization_config`. Experts are read, quantized and handed to the sharded writer one
at a time, so memory holds about one shard, never the whole model. The output is written to
`OUT_DIR.partial` and renamed when complete, so an interrupted run never leaves a folder that
looks finished.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from offload_rt.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, WritableLayout
from offload_rt.config import DEFAULT_GROUP_SIZE, MXFP4_GROUP, QuantConfig
from offload_rt.experts.mxfp4 import dequantize_mxfp4_new, quantize_mxfp4
from offload_rt.experts.quant import dequantize, quantize
from offload_rt.grid import ExpertKey
from offload_rt.models import family_of, open_checkpoint, parse_config
from offload_rt.tools.writer import write_checkpoint

DEFAULT_SHARD_BYTES = 4 * 10**9  # as Hugging Face's writers: a few GB per file
# `--format` names: bits and scheme (MXFP4's groups are always 32)
FORMATS = {"int8": (8, "affine"), "int4": (4, "affine"), "mxfp4": (4, "mxfp4")}


@dataclass
class QuantizeReport:
    folder: Path  # the quantized checkpoint
    experts: int  # experts quantized
    float_nbytes: int  # bytes of one expert in the source checkpoint, as stored
    quant_nbytes: int  # bytes of one quantized expert: codes, scales and offsets
    max_abs_error: float = 0.0  # largest |W - dequantized W| over every expert weight
    sum_sq_error: float = 0.0  # sum of squared errors over every expert weight
    sum_sq_weight: float = 0.0  # sum of squared weights, for the relative RMS error

    @property
    def relative_rms_error(self) -> float:
        return (self.sum_sq_error / self.sum_sq_weight) ** 0.5 if self.sum_sq_weight else 0.0


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    scheme: str = "affine",
) -> QuantizeReport:
    """Quantize the experts of the checkpoint in `src` into a new checkpoint folder `dst`:
    group-wise affine codes of `bits` (scheme "affine"), or MXFP4 (scheme "mxfp4", 4 bits in
    groups of 32 whatever `bits` and `group_size` say)."""
    src, dst = Path(src), Path(dst)
    if scheme == "mxfp4":
        bits, group_size = 4, MXFP4_GROUP
    quant = QuantConfig(bits, group_size, scheme)
    _check_destination(src, dst)
    ckpt = open_checkpoint(src)
    try:
        cfg = ckpt.config
        if cfg.quantization is not None:
            raise CheckpointError(f"{src}: its experts are quantized already")
        f, d = cfg.moe_intermediate_size, cfg.hidden_size
        quant.check_widths(d, f, str(src / "config.json"))
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quant.to_dict()
        # the output's names: the family's per-expert layout, quantized
        out_cfg = parse_config(config, str(src / "config.json"))
        dense = ckpt.expert_tensor_names()
        present = frozenset(n for n in ckpt.tensors if n not in dense)
        layout = family_of(config).spec(out_cfg, present).experts
        if not isinstance(layout, WritableLayout):
            raise CheckpointError(f"{src}: {cfg.model_type} experts cannot be written quantized")
        report = QuantizeReport(
            dst,
            cfg.num_experts_total,
            ckpt.expert_nbytes() // cfg.num_experts_total,
            2 * quant.nbytes(f, d) + quant.nbytes(d, f),
        )
        total = _dense_nbytes(ckpt) + report.experts * report.quant_nbytes
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        tensors = _tensors(ckpt, layout, quant, report, progress)
        shard = max_shard_bytes if total > max_shard_bytes else None  # small: one file
        write_checkpoint(partial, config, tensors, shard)
        _copy_side_files(src, partial)
    finally:
        ckpt.close()
    if dst.exists():
        dst.rmdir()  # empty, as checked
    partial.rename(dst)
    return report


def _check_destination(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output folder must differ from the model folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not an empty folder; give a new output folder")


def _dense_nbytes(ckpt: Checkpoint) -> int:
    experts = ckpt.expert_tensor_names()
    return sum(
        info.dtype.itemsize * int(torch.Size(info.shape).numel())
        for name, info in ckpt.tensors.items()
        if name not in experts
    )


def _tensors(
    ckpt: Checkpoint,
    layout: WritableLayout,
    quant: QuantConfig,
    report: QuantizeReport,
    progress: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the output: the others as stored first, then the experts quantized,
    as the output's layout stores them (one tensor per expert, or fused per layer)."""
    experts = ckpt.expert_tensor_names()
    for name in ckpt.tensors:
        if name not in experts:
            yield name, ckpt.get(name)
    grid = ckpt.config.grid
    bar = tqdm(total=grid.total, unit="expert", desc="quantizing", disable=not progress)

    def quantized(key: ExpertKey) -> dict[str, torch.Tensor]:
        out = {}
        for part, w in ckpt.expert(key.layer, key.expert).items():
            if part.endswith("_bias"):  # GPT-OSS's biases stay float
                out[part] = w
                continue
            q = _quantized(w, quant, f"{key} {part}", report)
            out.update({f"{part}.{name}": tensor for name, tensor in q.items()})
        bar.update(1)
        return out

    with bar:
        for layer in grid.layers:
            keys = (ExpertKey(layer, e) for e in range(grid.experts))
            yield from layout.stored(layer, (quantized(k) for k in keys))


def _quantized(
    w: torch.Tensor, quant: QuantConfig, name: str, report: QuantizeReport
) -> dict[str, torch.Tensor]:
    """One weight's stored parts, its error added to the report."""
    if quant.scheme == "mxfp4":
        blocks, scales = quantize_mxfp4(w, name)
        _measure(w, dequantize_mxfp4_new(blocks, scales, torch.float32), report)
        return {"blocks": blocks, "scales": scales}
    q = quantize(w, quant, name)
    _measure(w, dequantize(q, quant), report)
    return {"qweight": q.qweight, "scales": q.scales, "offsets": q.offsets}


def _measure(w: torch.Tensor, approx: torch.Tensor, report: QuantizeReport) -> None:
    err = approx.sub_(w)
    report.max_abs_error = max(report.max_abs_error, float(err.abs().max()))
    report.sum_sq_error += float(torch.linalg.vector_norm(err)) ** 2
    report.sum_sq_weight += float(torch.linalg.vector_norm(w.float())) ** 2


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and the like: every plain file but the weights and the
    files the writer makes."""
    for path in src.iterdir():
        skip = path.suffix == ".safetensors" or path.name in (INDEX_FILE, "config.json")
        if path.is_file() and not skip:
            shutil.copy2(path, dst / path.name)
