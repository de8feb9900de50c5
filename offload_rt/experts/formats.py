"""What an expert is in memory: its packed bytes, how it is packed from a checkpoint's parts,
and the matrices its FFN runs on. The store, the cache, the link and the wire move packed
buffers and ask the format for the rest; none of them branches on a format.

Formats here: float SwiGLU (`SwiGLUFormat`: [gate | up | down] in the compute dtype) and the
group-wise int8/int4 codec (`QuantFormat`, `quant.py`). A family picks one with `expert_format`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from offload_rt.config import ModelConfig
from offload_rt.experts.quant import ExpertCodec


class ExpertFormat(Protocol):
    storage_dtype: torch.dtype  # element type of a packed buffer
    numel: int  # elements of a packed buffer
    early_numel: int  # the leading elements the up-projection needs (numel: no early start)
    host_computable: bool  # the CPU can run it straight from a host buffer's views

    def views(self, buf: torch.Tensor) -> object:
        """Typed views of a packed buffer (numel,), made once per slot."""
        ...

    def weights(self, views: object) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 (2F, D) and w2 (D, F) in the compute dtype (quantized: dequantized into
        scratch, valid until the next call)."""
        ...

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """A checkpoint expert's parts (`Checkpoint.expert`) into a packed buffer."""
        ...


class SwiGLUFormat:
    """[gate | up | down] in the compute dtype: gate and up read as one stacked (2F, D)
    matrix, so the up-projection is one matmul; it can start once they have landed."""

    host_computable = True

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        self.hidden, self.intermediate = hidden, intermediate
        self.storage_dtype = dtype
        self.numel = 3 * hidden * intermediate
        self.early_numel = 2 * hidden * intermediate

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, d, n = self.intermediate, self.hidden, self.early_numel
        return buf[:n].view(2 * f, d), buf[n:].view(d, f)

    def weights(self, views: object) -> tuple[torch.Tensor, torch.Tensor]:
        return views  # type: ignore[return-value]

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        fd = self.hidden * self.intermediate
        if "gate_up" in parts:  # a fused checkpoint's slice: gate's rows, then up's
            out[: 2 * fd].copy_(parts["gate_up"].reshape(-1))
        else:
            out[:fd].copy_(parts["gate"].reshape(-1))
            out[fd : 2 * fd].copy_(parts["up"].reshape(-1))
        out[2 * fd :].copy_(parts["down"].reshape(-1))


class QuantFormat:
    """Group-wise int8/int4 experts (`quant.py`): the codec's bytes move; each use
    dequantizes into scratch, so neither an early start nor a host computation applies."""

    storage_dtype = torch.uint8
    host_computable = False

    def __init__(self, codec: ExpertCodec) -> None:
        self.codec = codec
        self.numel = codec.nbytes
        self.early_numel = codec.nbytes

    def views(self, buf: torch.Tensor) -> object:
        return self.codec.views(buf)

    def weights(self, views: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.dequantize(views)  # type: ignore[arg-type]

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        self.codec.pack(parts, out)


def expert_format(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ExpertFormat:
    """The format of `cfg`'s routed experts, computing in `dtype` on `device`."""
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    if cfg.quantization is not None:
        return QuantFormat(ExpertCodec(d, f, cfg.quantization, device, dtype))
    return SwiGLUFormat(d, f, dtype)


def expert_nbytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one packed expert of `cfg` computing in `dtype`."""
    fmt = expert_format(cfg, torch.device("meta"), dtype)
    return fmt.numel * fmt.storage_dtype.itemsize
