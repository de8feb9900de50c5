"""Hugging Face safetensors checkpoints of Mixtral: naming, validation, lazy tensor access, writing.

A checkpoint is a folder with `config.json` and either one `model.safetensors` or shards listed
in `model.safetensors.index.json`. Opening one reads only the safetensors headers: every tensor's
presence and shape is checked against the config before any generation, while the tensor data
stays in memory-mapped files until a caller asks for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from offload_rt.config import ConfigError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPERT_PROJECTIONS = ("w1", "w2", "w3")
DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# a quantized expert's parts (`offload_rt/experts/quant.py`) and their dtypes as stored
QUANT_PARTS = {"qweight": torch.uint8, "scales": torch.float16, "offsets": torch.float16}
STORED_DTYPES = {**DTYPES, "U8": torch.uint8}


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, broken or does not match its config."""


def expert_tensor_name(layer: int, expert: int, projection: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}.weight"


def quantized_tensor_name(layer: int, expert: int, projection: str, part: str) -> str:
    """`part` of a quantized projection: qweight, scales or offsets (replacing its `weight`)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}.{part}"


def router_tensor_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the coordinator holds (all but the experts), with its expected shape."""
    d, v = cfg.hidden_size, cfg.vocab_size
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q_out)
        shapes[router_tensor_name(layer)] = (cfg.num_local_experts, d)
    return shapes


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each expert projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"w1": (f, d), "w2": (d, f), "w3": (f, d)}


def expert_parts(cfg: ModelConfig, layer: int, expert: int) -> dict[str, tuple[str, tuple]]:
    """One expert's tensors: key ("w1", or "w1.qweight" when quantized) -> (name, shape)."""
    quant = cfg.quantization
    parts = {}
    for proj, (rows, cols) in projection_shapes(cfg).items():
        if quant is None:
            parts[proj] = (expert_tensor_name(layer, expert, proj), (rows, cols))
            continue
        for part in QUANT_PARTS:
            shape = quant.codes_shape(rows, cols) if part == "qweight" else None
            parts[f"{proj}.{part}"] = (
                quantized_tensor_name(layer, expert, proj, part),
                shape or quant.groups_shape(rows, cols),
            )
    return parts


def expert_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {
        name: shape
        for layer in range(cfg.num_hidden_layers)
        for expert in range(cfg.num_local_experts)
        for name, shape in expert_parts(cfg, layer, expert).values()
    }


@dataclass(frozen=True)
class TensorInfo:
    file: Path  # the safetensors file holding the tensor
    shape: tuple[int, ...]  # as stored
    dtype: torch.dtype  # as stored


class Checkpoint:
    """Validated, lazily read checkpoint. Use `Checkpoint.open(folder)`."""

    def __init__(
        self, folder: Path, config: ModelConfig, tensors: dict[str, TensorInfo], handles: dict
    ) -> None:
        self.folder = folder
        self.config = config
        self.tensors = tensors
        self._handles = handles

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: model folder does not exist")
        try:
            config = ModelConfig.from_folder(folder)
        except ConfigError as e:
            raise CheckpointError(str(e)) from e
        files = _safetensors_files(folder)
        handles, tensors = {}, {}
        try:
            for path, names in files.items():
                handles[path] = _open_file(path)
                tensors.update(_read_infos(handles[path], path, names))
            _check_tensors(tensors, config)
        except BaseException:
            handles.clear()
            raise
        return cls(folder, config, tensors, handles)

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's, else the embedding's as stored."""
        if self.config.dtype is not None:
            return getattr(torch, self.config.dtype)
        return self.tensors["model.embed_tokens.weight"].dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its memory-mapped file."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        try:
            return self._handles[info.file].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from e

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's w1, w2, w3 as stored; in a quantized checkpoint, each projection's
        parts instead ("w1.qweight", "w1.scales", "w1.offsets", ...)."""
        parts = expert_parts(self.config, layer, expert)
        return {key: self.get(name) for key, (name, _) in parts.items()}

    def expert_nbytes(self) -> int:
        return sum(
            _numel(info.shape) * info.dtype.itemsize
            for name, info in self.tensors.items()
            if ".block_sparse_moe.experts." in name
        )

    def close(self) -> None:
        self._handles.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _safetensors_files(folder: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the tensor names the index gives it (None: all it holds)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index}: not a safetensors index with a weight_map ({e})"
            ) from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        files: dict[Path, list[str] | None] = {}
        for name, shard in weight_map.items():
            path = folder / str(shard)
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} (holding {name!r}) is missing")
            files.setdefault(path, []).append(name)  # type: ignore[union-attr]
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _open_file(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _read_infos(handle, path: Path, names: list[str] | None) -> dict[str, TensorInfo]:
    present = set(handle.keys())
    wanted = sorted(present) if names is None else names
    infos = {}
    for name in wanted:
        if name not in present:
            raise CheckpointError(f"{path}: index lists tensor {name!r} but the file lacks it")
        sl = handle.get_slice(name)
        dtype = STORED_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {sl.get_dtype()}; "
                f"supported: {sorted(STORED_DTYPES)}"
            )
        infos[name] = TensorInfo(path, tuple(sl.get_shape()), dtype)
    return infos


def _check_tensors(tensors: Mapping[str, TensorInfo], cfg: ModelConfig) -> None:
    expected = {**dense_tensor_shapes(cfg), **expert_tensor_shapes(cfg)}
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name!r} (expected shape {list(shape)})")
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shape)}"
            )
        want = _expected_dtypes(name)
        if info.dtype not in want:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                f"{[str(d) for d in want]}"
            )


def _expected_dtypes(name: str) -> tuple[torch.dtype, ...]:
    part = name.rsplit(".", 1)[-1]
    if ".block_sparse_moe.experts." in name and part in QUANT_PARTS:
        return (QUANT_PARTS[part],)
    return tuple(DTYPES.values())


def write_checkpoint(
    folder: str | Path,
    config: Mapping[str, object],
    tensors: Iterator[tuple[str, torch.Tensor]],
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json and safetensors in the Hugging Face layout, sharded with an index when
    `max_shard_bytes` is given. Tensors are consumed one at a time, so a caller that streams them
    never holds more than a shard in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_names, total = 0, [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and max_shard_bytes is not None and shard_bytes + nbytes > max_shard_bytes:
            shard_names.append(_flush_shard(folder, shard, len(shard_names)))
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        shard_bytes += nbytes
        total += nbytes
    if max_shard_bytes is None:
        save_file(shard, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return
    shard_names.append(_flush_shard(folder, shard, len(shard_names)))
    _write_index(folder, shard_names, total)


def _flush_shard(folder: Path, shard: dict[str, torch.Tensor], i: int) -> tuple[str, list[str]]:
    name = f"model-{i + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    return name, list(shard)


def _write_index(folder: Path, shards: list[tuple[str, list[str]]], total: int) -> None:
    # the final shard count is known only now, so files are renamed to the -of-N convention
    n = len(shards)
    weight_map = {}
    for i, (tmp_name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
