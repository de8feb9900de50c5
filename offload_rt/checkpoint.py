"""Hugging Face safetensors checkpoints: validation, lazy tensor access, expert layouts, writing.

A checkpoint is a folder with `config.json` and either one `model.safetensors` or shards listed
in `model.safetensors.index.json`. Opening one reads only the safetensors headers: every tensor's
presence and shape is checked against what the model's family expects (`CheckpointSpec`,
built by `offload_rt/models/`) before any generation, while the tensor data
stays in memory-mapped files until a caller asks for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from offload_rt.config import ConfigError, ModelConfig, QuantConfig, read_json_object
from offload_rt.grid import ExpertGrid, ExpertKey

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
FLOAT_DTYPES = tuple(DTYPES.values())
# a quantized expert weight's parts and their dtypes as stored, by scheme (`QuantConfig`):
# affine int8/int4 (`offload_rt/experts/quant.py`), MXFP4 (`offload_rt/experts/mxfp4.py`)
QUANT_PARTS = {
    "affine": {"qweight": torch.uint8, "scales": torch.float16, "offsets": torch.float16},
    "mxfp4": {"blocks": torch.uint8, "scales": torch.uint8},
    "fp8": {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32},
}
FP8 = torch.float8_e4m3fn
STORED_DTYPES = {**DTYPES, "U8": torch.uint8, "F8_E4M3": FP8}
# the logical parts of a routed SwiGLU expert, whatever a family calls its tensors
EXPERT_PARTS = ("gate", "up", "down")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, broken or does not match its config."""


@dataclass(frozen=True)
class TensorRef:
    """One expert's piece of a stored tensor: the whole tensor, or slice [index] of a tensor
    that fuses a layer's experts on its first dimension (read lazily from the memory map)."""

    name: str  # tensor name in the checkpoint
    index: int | None = None  # the expert's index on a fused tensor's first dimension


class ExpertLayout(Protocol):
    """How a family's experts are stored: the tensors to check, and each expert's parts."""

    def tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Every expert tensor as stored: name -> (shape, allowed dtypes)."""
        ...

    def parts(self, key: ExpertKey) -> dict[str, TensorRef]:
        """One expert's parts as stored and where each is."""
        ...

    def logical(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's stored parts (read by `parts`) as the expert formats take them: "gate",
        "up", "down" as (out, in) matrices (quantized: "gate.qweight", "gate.blocks", ...),
        and GPT-OSS's "gate_bias", "up_bias", "down_bias". Views where the layout allows."""
        ...


@runtime_checkable
class WritableLayout(ExpertLayout, Protocol):
    """A layout `quantize` can write experts in."""

    def stored(
        self, layer: int, experts: Iterator[dict[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`logical` backwards, for writers: one layer's experts' logical parts, in expert
        order, as the layout stores them (name, tensor). Consumed lazily where the layout
        stores experts apart."""
        ...


@dataclass(frozen=True)
class CheckpointSpec:
    """What a family expects of a checkpoint (`offload_rt/models/`): its parsed config, every
    tensor the coordinator holds with its shape, and the layout of its experts."""

    config: ModelConfig
    dense: dict[str, tuple[int, ...]]  # name -> shape of every tensor but the experts'
    experts: ExpertLayout
    dtype_probe: str  # a float tensor whose stored dtype is the checkpoint's (the embedding)


# config.json as a dict, its path, and the tensor names the files hold -> the family's spec
SpecFactory = Callable[[dict, str, frozenset], CheckpointSpec]


@dataclass(frozen=True)
class PerExpertLayout:
    """One tensor per expert and projection, as the hub ships Mixtral, Qwen and OLMoE:
    `template.format(layer=, expert=, proj=)` + ".weight" (quantized: ".qweight", ".scales",
    ".offsets", as `offload-rt quantize` writes them)."""

    grid: ExpertGrid
    template: str  # e.g. "model.layers.{layer}.mlp.experts.{expert}.{proj}"
    projections: dict[str, str]  # logical part -> the family's name ("gate" -> "gate_proj")
    shapes: dict[str, tuple[int, int]]  # logical part -> (out, in)
    quant: QuantConfig | None = None

    def names(self, key: ExpertKey) -> dict[str, str]:
        """Logical part ("gate", or "gate.qweight" when quantized) -> tensor name."""
        out = {}
        for part in EXPERT_PARTS:
            base = self.template.format(
                layer=key.layer, expert=key.expert, proj=self.projections[part]
            )
            if self.quant is None:
                out[part] = base + ".weight"
            else:
                stored = QUANT_PARTS[self.quant.scheme]
                out.update({f"{part}.{q}": f"{base}.{q}" for q in stored})
        return out

    def shape_of(self, part: str) -> tuple[int, ...]:
        proj, _, q = part.partition(".")
        rows, cols = self.shapes[proj]
        if not q:
            return rows, cols
        assert self.quant is not None
        if q == "qweight":
            return self.quant.codes_shape(rows, cols)
        if q == "weight":  # fp8: one byte a weight
            return rows, cols
        if q == "blocks":  # MXFP4 codes as the release stores them: 16 bytes a group of 32
            return rows, cols // self.quant.group_size, self.quant.group_size // 2
        return self.quant.groups_shape(rows, cols)

    def tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        out = {}
        for key in self.grid.keys():
            for part, name in self.names(key).items():
                q = part.partition(".")[2]
                scheme = self.quant.scheme if self.quant else ""
                out[name] = (self.shape_of(part), (QUANT_PARTS[scheme][q],) if q else FLOAT_DTYPES)
        return out

    def parts(self, key: ExpertKey) -> dict[str, TensorRef]:
        return {part: TensorRef(name) for part, name in self.names(key).items()}

    def logical(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return stored

    def stored(
        self, layer: int, experts: Iterator[dict[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for e, parts in enumerate(experts):
            names = self.names(ExpertKey(layer, e))
            yield from ((names[part], tensor) for part, tensor in parts.items())


@dataclass(frozen=True)
class FusedLayout:
    """A layer's experts fused into 3-D tensors, as transformers 5 writes them with
    `save_original_format=False` (and GPT-OSS ships): `gate_up` (E, 2F, D), gate's rows
    first, and `down` (E, D, F); one expert is slice [e] of each."""

    grid: ExpertGrid
    gate_up: str  # the fused (E, 2F, D) tensor's name, a template with {layer}
    down: str
    intermediate: int  # F
    hidden: int  # D

    def tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        e, f, d = self.grid.experts, self.intermediate, self.hidden
        out = {}
        for layer in self.grid.layers:
            out[self.gate_up.format(layer=layer)] = ((e, 2 * f, d), FLOAT_DTYPES)
            out[self.down.format(layer=layer)] = ((e, d, f), FLOAT_DTYPES)
        return out

    def parts(self, key: ExpertKey) -> dict[str, TensorRef]:
        return {
            "gate_up": TensorRef(self.gate_up.format(layer=key.layer), key.expert),
            "down": TensorRef(self.down.format(layer=key.layer), key.expert),
        }

    def logical(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gate, up = stored["gate_up"].split(self.intermediate)  # (F, D) each
        return {"gate": gate, "up": up, "down": stored["down"]}


@dataclass(frozen=True)
class TensorInfo:
    file: Path  # the safetensors file holding the tensor
    shape: tuple[int, ...]  # as stored
    dtype: torch.dtype  # as stored


class Checkpoint:
    """Validated, lazily read checkpoint. Open one with `offload_rt.models.open_checkpoint`
    (which knows the families), or `Checkpoint.open(folder, spec_factory)`."""

    def __init__(
        self, folder: Path, spec: CheckpointSpec, tensors: dict[str, TensorInfo], handles: dict
    ) -> None:
        self.folder = folder
        self.spec = spec
        self.config = spec.config
        self.tensors = tensors
        self._handles = handles

    @classmethod
    def open(cls, folder: str | Path, spec_factory: SpecFactory) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: model folder does not exist")
        path = folder / CONFIG_FILE
        raw = read_json_object(path, "no config.json in the model folder", CheckpointError)
        files = _safetensors_files(folder)
        handles, tensors = {}, {}
        try:
            for file, names in files.items():
                handles[file] = _open_file(file)
                tensors.update(_read_infos(handles[file], file, names))
            try:
                spec = spec_factory(raw, str(path), frozenset(tensors))
            except ConfigError as e:
                raise CheckpointError(str(e)) from e
            _check_tensors(tensors, spec)
        except BaseException:
            handles.clear()
            raise
        return cls(folder, spec, tensors, handles)

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's, else the embedding's as stored."""
        if self.config.dtype is not None:
            return getattr(torch, self.config.dtype)
        return self.tensors[self.spec.dtype_probe].dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its memory-mapped file."""
        return self.read(TensorRef(name))

    def read(self, ref: TensorRef) -> torch.Tensor:
        """A whole tensor, or one expert's slice of a fused one (only that slice is read)."""
        info = self.tensors.get(ref.name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {ref.name!r} in the checkpoint")
        try:
            handle = self._handles[info.file]
            if ref.index is None:
                return handle.get_tensor(ref.name)
            return handle.get_slice(ref.name)[ref.index : ref.index + 1][0]
        except SafetensorError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {ref.name!r}: {e}") from e

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's parts by logical name (`ExpertLayout.logical`)."""
        layout = self.spec.experts
        parts = layout.parts(ExpertKey(layer, expert))
        return layout.logical({part: self.read(ref) for part, ref in parts.items()})

    def expert_tensor_names(self) -> set[str]:
        return set(self.spec.experts.tensors())

    def expert_nbytes(self) -> int:
        experts = self.expert_tensor_names()
        return sum(
            _numel(info.shape) * info.dtype.itemsize
            for name, info in self.tensors.items()
            if name in experts
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


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """An fp8 weight (out, in) and its float32 scale per block of quant's (row_block,
    group_size), (ceil(out / rows), ceil(in / columns)) -> the float32 weight w · scale, as
    DeepSeek-V3's release defines it (blocks at the edges may be partial)."""
    rows, cols = w.shape
    rb, cb = quant.row_block, quant.group_size
    if scale_inv.shape != (-(-rows // rb), -(-cols // cb)):
        raise CheckpointError(
            f"an fp8 weight {list(w.shape)} in blocks of {[rb, cb]} needs scales "
            f"{[-(-rows // rb), -(-cols // cb)]}, got {list(scale_inv.shape)}"
        )
    scale = scale_inv.repeat_interleave(rb, dim=0)[:rows].repeat_interleave(cb, dim=1)[:, :cols]
    return w.float() * scale


def _check_tensors(tensors: Mapping[str, TensorInfo], spec: CheckpointSpec) -> None:
    quant = spec.config.quantization
    dense = FLOAT_DTYPES + ((FP8,) if quant is not None and quant.scheme == "fp8" else ())
    expected = {name: (shape, dense) for name, shape in spec.dense.items()}
    expected.update(spec.experts.tensors())
    for name, (shape, dtypes) in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name!r} (expected shape {list(shape)})")
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shape)}"
            )
        if info.dtype not in dtypes:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of "
                f"{[str(d) for d in dtypes]}"
            )
