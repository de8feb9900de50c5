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

import torch
from tqdm import tqdm

from offload_rt.checkpoint import DTYPES, Checkpoint, CheckpointError, write_checkpoint
from offload_rt.config import ModelConfig
from offload_rt.convert.params import ConvertError, config_from_params, read_params
from offload_rt.convert.tokenizer import SpmError, SpmModel, read_spm, write_tokenizer_files
from offload_rt.convert.weights import Sources, hf_tensors, interleaved_to_half_split

PARAMS_FILE = "params.json"
SPM_FILE = "tokenizer.model"
GiB = 2**30
# a shard waits in RAM until it is written: 2 GiB keeps a 16-32 GiB machine comfortable
DEFAULT_SHARD_BYTES = 2 * GiB
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
    if not src.is_dir():
        raise ConvertError(f"{src}: source folder does not exist")
    _check_out(out)
    params_path = src / PARAMS_FILE
    params = read_params(params_path)
    spm_path = src / SPM_FILE
    spm = _read_spm(spm_path)
    sources = Sources.open(src)
    torch_dtype = _output_dtype(dtype, sources)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    bos = spm.bos_id if spm is not None else DEFAULT_BOS
    eos = spm.eos_id if spm is not None else DEFAULT_EOS
    config = config_from_params(params, params_path, bos, eos, dtype_name)
    cfg = ModelConfig.from_dict(config)
    sources.check(cfg, params_path)
    notes = _param_notes(params, params_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = _write_weights(sources, cfg, torch_dtype, config, tmp, max_shard_bytes, progress)
        has_json = False
        if spm is None:
            notes.append(f"{spm_path} not found: no tokenizer written; generate from token ids")
        else:
            _, has_json, why = write_tokenizer_files(spm_path, tmp, cfg.max_position_embeddings)
            if not has_json:
                notes.append(f"no tokenizer.json: {why}. See docs/operations-cluster.md")
        _verify(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertReport(out, written[0], written[1], dtype_name, has_json, tuple(notes))


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
        if name not in ("float32", "bfloat16", "float16"):
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
    sources: Sources,
    cfg: ModelConfig,
    dtype: torch.dtype,
    config: dict,
    folder: Path,
    max_shard_bytes: int,
    progress: bool,
) -> tuple[int, int]:
    """Write config.json and the shards; returns (tensors, bytes) written."""
    written = [0, 0]

    def counted(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            written[0] += 1
            written[1] += t.numel() * t.element_size()
            yield name, t

    bar = tqdm(
        total=sources.nbytes(),
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        tensors = counted(hf_tensors(sources, cfg, dtype, bar.update))
        write_checkpoint(folder, config, tensors, max_shard_bytes)
    return written[0], written[1]


def _verify(folder: Path) -> None:
    """Open the result as `offload_rt.load` will: every tensor present with its shape."""
    try:
        Checkpoint.open(folder).close()
    except CheckpointError as e:
        raise ConvertError(f"the converted checkpoint does not open: {e}") from e
