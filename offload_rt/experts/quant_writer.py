"""Writing a quantized checkpoint (`offload-rt quantize MODEL_DIR OUT_DIR --bits 8|4`).

Every tensor but the expert weights is copied as stored. Each expert projection's `weight` is
replaced by its `qweight`, `scales` and `offsets` (the format is in `quant.py`), and config.json
gains a `quantization_config`. Experts are read, quantized and handed to the sharded writer one
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

from offload_rt.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    expert_parts,
    projection_shapes,
    quantized_tensor_name,
    write_checkpoint,
)
from offload_rt.config import DEFAULT_GROUP_SIZE, QuantConfig
from offload_rt.experts.quant import QuantizedTensor, dequantize, quantize

DEFAULT_SHARD_BYTES = 4 << 30  # as Hugging Face's writers: a few GB per file


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
) -> QuantizeReport:
    """Quantize the experts of the checkpoint in `src` into a new checkpoint folder `dst`."""
    src, dst = Path(src), Path(dst)
    quant = QuantConfig(bits, group_size)
    _check_destination(src, dst)
    ckpt = Checkpoint.open(src)
    try:
        cfg = ckpt.config
        if cfg.quantization is not None:
            raise CheckpointError(f"{src}: its experts are quantized already")
        quant.check_widths(cfg.hidden_size, cfg.intermediate_size, str(src / "config.json"))
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = quant.to_dict()
        report = QuantizeReport(
            dst,
            cfg.num_experts_total,
            sum(ckpt.tensors[n].dtype.itemsize * r * c for n, (r, c) in _first_expert(ckpt)),
            sum(quant.nbytes(r, c) for r, c in projection_shapes(cfg).values()),
        )
        total = _dense_nbytes(ckpt) + report.experts * report.quant_nbytes
        partial = dst.with_name(dst.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        tensors = _tensors(ckpt, quant, report, progress)
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


def _first_expert(ckpt: Checkpoint) -> list[tuple[str, tuple[int, int]]]:
    return [(name, shape) for name, shape in expert_parts(ckpt.config, 0, 0).values()]


def _expert_names(ckpt: Checkpoint) -> set[str]:
    cfg = ckpt.config
    return {
        name
        for layer in range(cfg.num_hidden_layers)
        for expert in range(cfg.num_local_experts)
        for name, _ in expert_parts(cfg, layer, expert).values()
    }


def _dense_nbytes(ckpt: Checkpoint) -> int:
    experts = _expert_names(ckpt)
    return sum(
        info.dtype.itemsize * int(torch.Size(info.shape).numel())
        for name, info in ckpt.tensors.items()
        if name not in experts
    )


def _tensors(
    ckpt: Checkpoint, quant: QuantConfig, report: QuantizeReport, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the output: the others as stored first, then the experts quantized."""
    experts = _expert_names(ckpt)
    for name in ckpt.tensors:
        if name not in experts:
            yield name, ckpt.get(name)
    cfg = ckpt.config
    bar = tqdm(total=cfg.num_experts_total, unit="expert", desc="quantizing", disable=not progress)
    with bar:
        for layer in range(cfg.num_hidden_layers):
            for expert in range(cfg.num_local_experts):
                for proj, w in ckpt.expert(layer, expert).items():
                    q = quantize(w, quant, name=f"layer {layer} expert {expert} {proj}")
                    _measure(w, q, quant, report)
                    for part in ("qweight", "scales", "offsets"):
                        yield quantized_tensor_name(layer, expert, proj, part), getattr(q, part)
                bar.update(1)


def _measure(
    w: torch.Tensor, q: QuantizedTensor, quant: QuantConfig, report: QuantizeReport
) -> None:
    err = dequantize(q, quant).sub_(w)
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
