"""`offload-rt convert`: the original Mixtral release -> the Hugging Face layout.

    SRC: consolidated.00.pth [consolidated.01.pth ...], params.json, tokenizer.model
    OUT: config.json, model-0000N-of-0000M.safetensors + model.safetensors.index.json,
         tokenizer.model, tokenizer_config.json, tokenizer.json

Every tensor is checked against params.json before anything is written; tensors then stream
one at a time from memory-mapped files into shards of at most `max_shard_bytes`, so the RAM
used is about one shard plus one source tensor, whatever the checkpoint's size. OUT is built
beside its final place and renamed in one step: a failed or interrupted run leaves no
half-written checkpoint. The checkpoint layer: imports config and checkpoint only.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from offload_rt.checkpoint import DTYPES, CheckpointError
from offload_rt.config import DTYPE_NAMES, ModelConfig
from offload_rt.convert.params import ConvertError, config_from_params, read_params
from offload_rt.convert.tokenizer import SpmError, SpmModel, read_spm, write_tokenizer_files
from offload_rt.convert.weights import Sources, hf_tensors, interleaved_to_half_split
from offload_rt.models import open_checkpoint, parse_config
from offload_rt.tools.writer import write_checkpoint

PARAMS_FILE = "params.json"
SPM_FILE = "tokenizer.model"
# a shard waits in RAM until it is written: 2 GB keeps a 16-32 GB machine comfortable; in
# 10^9 bytes, the unit of `--max-shard-gb` in both `convert` and `quantize`
DEFAULT_SHARD_BYTES = 2 * 10**9
# Mixtral's tokenizer.model has these; used only when SRC has none
DEFAULT_BOS, DEFAULT_EOS = 1, 2

__all__ = [
    "ConvertError",
    "ConvertReport",
    "DEFAULT_SHARD_BYTES",
    "convert_checkpoint",
    "interleaved_to_half_split",
]


@dataclass(frozen=True)
class ConvertReport:
    out: Path  # the converted folder
    tensors: int  # tensors written
    bytes_written: int  # tensor bytes written
    dtype: str  # dtype of the written tensors
    tokenizer_json: bool  # whether tokenizer.json was written
    notes: tuple[str, ...]  # what the user should know (no tokenizer, defaults filled ...)


@dataclass
class _Job:
    """What a conversion writes, all checked before any byte is."""

    sources: Sources  # the original tensors, memory-mapped
    config: dict[str, Any]  # config.json
    cfg: ModelConfig  # the same, parsed
    dtype: torch.dtype  # of the written tensors
    spm_path: Path | None  # tokenizer.model; None: SRC has none
    notes: list[str]  # for the user


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> ConvertReport:
    """Convert the original-format folder `src` into a new Hugging Face folder `out`.

    dtype: "float32", "bfloat16" or "float16" (None: the source's, bfloat16 for the release).
    Raises ConvertError naming the file, tensor or field at fault; `out` must not exist or be
    an empty folder.
    """
    src, out = Path(src), Path(out)
    _check_out(out)
    job = _prepare(src, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors, nbytes = _write_weights(job, tmp, max_shard_bytes, progress)
        has_json = _write_tokenizer(job, tmp)
        _verify(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dtype_name = str(job.dtype).removeprefix("torch.")
    return ConvertReport(out, tensors, nbytes, dtype_name, has_json, tuple(job.notes))


def _prepare(src: Path, dtype: str | None) -> _Job:
    if not src.is_dir():
        raise ConvertError(f"{src}: source folder does not exist")
    params_path = src / PARAMS_FILE
    params = read_params(params_path)
    spm_path = src / SPM_FILE
    spm = _read_spm(spm_path)
    sources = Sources.open(src)
    torch_dtype = _output_dtype(dtype, sources)
    # a model without these pieces has a bos/eos id of -1
    bos, eos = (spm.bos_id, spm.eos_id) if spm is not None else (DEFAULT_BOS, DEFAULT_EOS)
    config = config_from_params(
        params,
        params_path,
        bos if bos >= 0 else None,
        eos if eos >= 0 else None,
        str(torch_dtype).removeprefix("torch."),
    )
    cfg = parse_config(config)
    sources.check(cfg, params_path)
    notes = _param_notes(params, params_path)
    if spm is None:
        notes.append(f"{spm_path} not found: no tokenizer written; generate from token ids")
    return _Job(sources, config, cfg, torch_dtype, spm_path if spm else None, notes)


def _write_tokenizer(job: _Job, folder: Path) -> bool:
    """Tokenizer files into `folder`; whether tokenizer.json is among them."""
    if job.spm_path is None:
        return False
    _, has_json, why = write_tokenizer_files(job.spm_path, folder, job.cfg.max_position_embeddings)
    if not has_json:
        job.notes.append(f"no tokenizer.json: {why}. See cluster/README.md (convert)")
    return has_json


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: already exists and is not an empty folder; not overwriting")


def _read_spm(path: Path) -> SpmModel | None:
    if not path.is_file():
        return None
    try:
        return read_spm(path)
    except SpmError as e:
        raise ConvertError(str(e)) from e


def _output_dtype(name: str | None, sources: Sources) -> torch.dtype:
    if name is not None:
        if name not in DTYPE_NAMES:
            raise ConvertError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
        return getattr(torch, name)
    found = {t.dtype for t in sources.tensors.values()}
    if len(found) != 1 or next(iter(found)) not in DTYPES.values():
        raise ConvertError(
            f"the source tensors have dtypes {sorted(map(str, found))}; choose one with dtype="
        )
    return found.pop()


def _param_notes(params: dict, path: Path) -> list[str]:
    notes = []
    if "rope_theta" not in params:
        notes.append(f"{path} has no rope_theta: used 1e6, Mixtral's")
    if "max_seq_len" not in params:
        notes.append(f"{path} has no max_seq_len: used 32768, Mixtral's context length")
    return notes


def _write_weights(
    job: _Job, folder: Path, max_shard_bytes: int, progress: bool
) -> tuple[int, int]:
    """Write config.json and the shards; returns (tensors, bytes) written."""
    written = [0, 0]

    def counted(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            written[0] += 1
            written[1] += t.numel() * t.element_size()
            yield name, t

    total = job.sources.nbytes()
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        tensors = counted(hf_tensors(job.sources, job.cfg, job.dtype, bar.update))
        write_checkpoint(folder, job.config, tensors, max_shard_bytes)
    return written[0], written[1]


def _verify(folder: Path) -> None:
    """Open the result as `offload_rt.load` will: every tensor present with its shape."""
    try:
        open_checkpoint(folder).close()
    except CheckpointError as e:
        raise ConvertError(f"the converted checkpoint does not open: {e}") from e
