"""Tensors of the original Mixtral release -> the Hugging Face layout, streamed one at a time.

Names, the fused expert layout and the rotary order follow transformers'
`convert_mixtral_weights_to_hf.py`; unlike that script, tensors are read from memory-mapped
files and written as they are converted, so the whole model is never in RAM:

    original                                     Hugging Face
    tok_embeddings.weight (V, D)                 model.embed_tokens.weight
    layers.L.attention.wq / wk (H*hd, D)         model.layers.L.self_attn.q_proj / k_proj,
                                                 rows of each head reordered (rotary, below)
    layers.L.attention.wv / wo                   ...v_proj / o_proj
    layers.L.attention_norm / ffn_norm           ...input_layernorm / post_attention_layernorm
    layers.L.block_sparse_moe.gate.weight (E, D) ...block_sparse_moe.gate.weight
    layers.L.block_sparse_moe.w1, w3 (E*F, D)    ...experts.E.w1 / w3 (F, D): row blocks of F
    layers.L.block_sparse_moe.w2 (E*F, D)        ...experts.E.w2 (D, F): each block transposed
    norm.weight, output.weight                   model.norm.weight, lm_head.weight
"""

from __future__ import annotations

import ctypes
import mmap
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path

import torch

from offload_rt.checkpoint import (
    DTYPES,
)
from offload_rt.config import ModelConfig
from offload_rt.convert.params import ConvertError

EXPERT_PROJECTIONS = ("w1", "w2", "w3")  # Mixtral's gate, down and up


def expert_tensor_name(layer: int, expert: int, projection: str) -> str:
    """The hub's name of a Mixtral expert projection (the converter's output)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}.weight"


def router_tensor_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


SOURCE_PATTERN = re.compile(r"consolidated\.(\d+)\.pth?")
_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages; a no-op on anonymous memory without swap
# one source tensor -> its Hugging Face tensors
_Convert = Callable[[torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def interleaved_to_half_split(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows of the original release -> the Hugging Face order.

    The original rotary embedding rotates adjacent pairs (x0, x1), (x2, x3)... of each head;
    transformers' rotates (x_i, x_{i + hd/2}). Putting each head's even rows first and its odd
    rows after turns one into the other; q.k is unchanged because q and k get the same order.
    """
    rows, d = w.shape  # (heads * hd, D)
    return w.reshape(heads, rows // heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def original_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original-format checkpoint, with the shape `cfg` implies."""
    d, v, f, e = cfg.hidden_size, cfg.vocab_size, cfg.moe_intermediate_size, cfg.experts_per_layer
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d)}
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "attention.wq.weight"] = (q_out, d)
        shapes[p + "attention.wk.weight"] = (kv_out, d)
        shapes[p + "attention.wv.weight"] = (kv_out, d)
        shapes[p + "attention.wo.weight"] = (d, q_out)
        shapes[p + "block_sparse_moe.gate.weight"] = (e, d)
        for proj in EXPERT_PROJECTIONS:  # all three stacked over experts as (E*F, D)
            shapes[p + f"block_sparse_moe.{proj}"] = (e * f, d)
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (v, d)
    return shapes


class Sources:
    """The original tensors, memory-mapped, with the file each one came from."""

    def __init__(self, tensors: dict[str, torch.Tensor], files: dict[str, Path]) -> None:
        self.tensors = tensors
        self.files = files

    @classmethod
    def open(cls, folder: Path) -> Sources:
        paths = source_files(folder)
        tensors: dict[str, torch.Tensor] = {}
        files: dict[str, Path] = {}
        for path in paths:
            for name, t in _load_mmap(path).items():
                if name in files:
                    raise ConvertError(
                        f"tensor {name!r} is in both {files[name]} and {path}: checkpoints "
                        "that split each tensor over several files (tensor parallel) are not "
                        "supported; every consolidated file must hold whole, distinct tensors"
                    )
                tensors[name], files[name] = t, path
        return cls(tensors, files)

    def check(self, cfg: ModelConfig, params: Path) -> None:
        """Every expected tensor present with its shape and a supported dtype; nothing else."""
        expected = original_tensor_shapes(cfg)
        where = ", ".join(sorted({p.name for p in self.files.values()}))
        for name, shape in expected.items():
            t = self.tensors.get(name)
            if t is None:
                raise ConvertError(
                    f"{where}: missing tensor {name!r} (expected shape {list(shape)})"
                )
            if tuple(t.shape) != shape:
                raise ConvertError(
                    f"{self.files[name]}: tensor {name!r} has shape {list(t.shape)}, "
                    f"{params} implies {list(shape)}"
                )
            if t.dtype not in DTYPES.values():
                raise ConvertError(
                    f"{self.files[name]}: tensor {name!r} has dtype {t.dtype}; "
                    f"supported: {sorted(str(d) for d in DTYPES.values())}"
                )
        unknown = sorted(set(self.tensors) - set(expected))
        if unknown:
            raise ConvertError(
                f"{where}: {len(unknown)} tensors this converter does not know, e.g. "
                f"{unknown[:5]}: not a Mixtral checkpoint of the original release, or one "
                f"{params} does not describe"
            )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def convert(
        self, name: str, convert: _Convert, on_done: Callable[[int], None]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        t = self.tensors[name]
        yield from convert(t)
        _release(t)
        on_done(t.numel() * t.element_size())


def source_files(folder: Path) -> list[Path]:
    """The consolidated.NN.pth (or .pt) files of `folder`, by number."""
    found = sorted(
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_file() and (m := SOURCE_PATTERN.fullmatch(p.name))
    )
    if not found:
        raise ConvertError(
            f"{folder}: no consolidated.00.pth (the original release's weights) in the folder"
        )
    return [p for _, p in found]


def _load_mmap(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, zipfile errors ...
        raise ConvertError(
            f"{path}: not a readable torch checkpoint for memory-mapped loading ({e})"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConvertError(f"{path}: expected a dict of named tensors, got {type(state).__name__}")
    return state


@cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _release(t: torch.Tensor) -> None:
    """Give back the pages a memory-mapped source tensor was read into.

    They are clean file pages the kernel could reclaim anyway, but until then they count in
    the process's RSS: without this, converting 87 GB shows an RSS of 87 GB (or of all RAM).
    MADV_PAGEOUT never changes what the memory holds, so it is safe on any range.
    """
    libc = _libc()
    if libc is None or t.numel() == 0:
        return
    start = t.data_ptr() & ~(mmap.PAGESIZE - 1)
    end = t.data_ptr() + t.numel() * t.element_size()
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in `dtype`, so no shard waiting to be written pins a source page."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def hf_tensors(
    src: Sources, cfg: ModelConfig, dtype: torch.dtype, on_done: Callable[[int], None]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each Hugging Face tensor in layer order, converted from its source when asked for. When
    a source tensor's last output has been taken, its pages are given back and `on_done` gets
    its byte count (for a progress bar)."""
    for orig, convert in conversion_plan(cfg, dtype):
        yield from src.convert(orig, convert, on_done)


def conversion_plan(cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, _Convert]]:
    """(source tensor name, how it becomes Hugging Face tensors), in the order written."""

    def same(hf: str) -> _Convert:
        return lambda t: [(hf, _own(t, dtype))]

    plan = [("tok_embeddings.weight", same("model.embed_tokens.weight"))]
    for layer in range(cfg.num_hidden_layers):
        plan += _layer_plan(layer, cfg, dtype, same)
    return plan + [
        ("norm.weight", same("model.norm.weight")),
        ("output.weight", same("lm_head.weight")),
    ]


def _layer_plan(
    layer: int, cfg: ModelConfig, dtype: torch.dtype, same: Callable[[str], _Convert]
) -> list[tuple[str, _Convert]]:
    o, p = f"layers.{layer}.", f"model.layers.{layer}."

    def rotary(hf: str, heads: int) -> _Convert:
        return lambda t: [(p + hf, _own(interleaved_to_half_split(t, heads), dtype))]

    def experts(proj: str) -> _Convert:
        def split(fused: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
            for expert, block in enumerate(fused.split(cfg.moe_intermediate_size)):  # (F, D)
                # w2 is stored per expert as (F, D): transposed against nn.Linear's (D, F)
                w = block.T if proj == "w2" else block
                yield expert_tensor_name(layer, expert, proj), _own(w, dtype)

        return split

    return [
        (o + "attention_norm.weight", same(p + "input_layernorm.weight")),
        (o + "ffn_norm.weight", same(p + "post_attention_layernorm.weight")),
        (o + "attention.wq.weight", rotary("self_attn.q_proj.weight", cfg.num_attention_heads)),
        (o + "attention.wk.weight", rotary("self_attn.k_proj.weight", cfg.num_key_value_heads)),
        (o + "attention.wv.weight", same(p + "self_attn.v_proj.weight")),
        (o + "attention.wo.weight", same(p + "self_attn.o_proj.weight")),
        (o + "block_sparse_moe.gate.weight", same(router_tensor_name(layer))),
        *((o + f"block_sparse_moe.{proj}", experts(proj)) for proj in EXPERT_PROJECTIONS),
    ]
