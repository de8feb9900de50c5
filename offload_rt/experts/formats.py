"""What an expert is in memory: its packed bytes, how it is packed from a checkpoint's parts,
and the FFN it computes. The store, the cache, the link and the wire move packed buffers and ask
the format for the rest; none of them branches on a format.

Formats here: float experts in the compute dtype (`FloatFormat`), and quantized ones whose
codes move and are dequantized on use (`QuantFormat`: group-wise int8/int4 of `quant.py`, or
MXFP4 of `mxfp4.py`). Either holds plain SwiGLU experts or GPT-OSS's clamped SwiGLU with
biases (`model/ffn.py`). A family's config picks one with `expert_format`.

A checkpoint expert's parts come by logical name (`ExpertLayout.logical`): "gate", "up",
"down" as (out, in) matrices, quantized "gate.qweight" and the like, and with GPT-OSS
"gate_bias", "up_bias", "down_bias".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from offload_rt.config import ClampedSwiGLUConfig, ModelConfig
from offload_rt.experts.quant import ExpertCodec
from offload_rt.model.ffn import ClampedSwiGLU, ExpertFFN, SwiGLU


class ExpertFormat(Protocol):
    storage_dtype: torch.dtype  # element type of a packed buffer
    numel: int  # elements of a packed buffer
    early_numel: int  # the leading elements the up-projection needs (numel: no early start)
    # `weights` of the same views stays valid across calls (no scratch): callers may keep it
    stable_weights: bool

    def views(self, buf: torch.Tensor) -> object:
        """Typed views of a packed buffer (numel,), made once per slot."""
        ...

    def weights(self, views: object) -> ExpertFFN:
        """The expert ready to compute (quantized: dequantized into scratch, valid until the
        next call)."""
        ...

    def host_ffn(self, buf: torch.Tensor) -> ExpertFFN:
        """The expert in host buffer `buf` computed by the CPU, whatever the device (made
        once per buffer: it holds views)."""
        ...

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """A checkpoint expert's logical parts into a packed buffer."""
        ...


class FloatFormat:
    """[gate | up | down] in the compute dtype, GPT-OSS's as [gate | up | gate and up biases |
    down | down bias]: gate and up read as one stacked (2F, D) matrix, so the up-projection is
    one matmul; it can start once they (and their biases) have landed."""

    stable_weights = True  # the expert is the views themselves

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        dtype: torch.dtype,
        clamped: ClampedSwiGLUConfig | None = None,
    ) -> None:
        self.hidden, self.intermediate, self.clamped = hidden, intermediate, clamped
        self.storage_dtype = dtype
        biases = 0 if clamped is None else 2 * intermediate + hidden
        self.numel = 3 * hidden * intermediate + biases
        self.early_numel = 2 * hidden * intermediate + (0 if clamped is None else 2 * intermediate)

    def views(self, buf: torch.Tensor) -> ExpertFFN:
        f, d, fd = self.intermediate, self.hidden, self.hidden * self.intermediate
        if self.clamped is None:
            return SwiGLU(buf[: 2 * fd].view(2 * f, d), buf[2 * fd :].view(d, f))
        n = self.early_numel
        return ClampedSwiGLU(
            w13=buf[: 2 * fd].view(2 * f, d),
            b13=buf[2 * fd : n],
            w2=buf[n : n + fd].view(d, f),
            b2=buf[n + fd :],
            limit=self.clamped.limit,
            alpha=self.clamped.alpha,
        )

    def weights(self, views: object) -> ExpertFFN:
        return views  # type: ignore[return-value]

    def host_ffn(self, buf: torch.Tensor) -> ExpertFFN:
        return self.views(buf)

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        order = ["gate", "up", "down"]
        if self.clamped is not None:
            order = ["gate", "up", "gate_bias", "up_bias", "down", "down_bias"]
        start = 0
        for name in order:
            n = parts[name].numel()
            out[start : start + n].view(parts[name].shape).copy_(parts[name])
            start += n


class QuantFormat:
    """Quantized experts (`quant.py`, `mxfp4.py`): the codec's bytes move, whole (no early
    start); each use computes from the codes on the CPU, or dequantizes into the device's
    scratch. The CPU computes a host buffer through a CPU twin of the codec (its own scratch,
    for products of many rows), so a device's scratch is never shared with the host."""

    storage_dtype = torch.uint8

    def __init__(self, codec: ExpertCodec) -> None:
        self.codec = codec
        self.numel = codec.nbytes
        self.early_numel = codec.nbytes
        cpu = torch.device("cpu")
        self.host_codec = codec if codec.device == cpu else codec.on(cpu)
        # on the CPU an expert multiplies from its codes (views); elsewhere it is dequantized
        # into the codec's scratch at each `weights`
        self.stable_weights = codec.device.type == "cpu"

    def views(self, buf: torch.Tensor) -> object:
        return self.codec.views(buf)

    def weights(self, views: object) -> ExpertFFN:
        return self.codec.ffn(views)  # type: ignore[arg-type]

    def host_ffn(self, buf: torch.Tensor) -> ExpertFFN:
        return self.host_codec.ffn(self.host_codec.views(buf))

    def pack(self, parts: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        self.codec.pack(parts, out)


def expert_format(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ExpertFormat:
    """The format of `cfg`'s routed experts, computing in `dtype` on `device`."""
    d, f, clamped = cfg.hidden_size, cfg.moe_intermediate_size, cfg.clamped_swiglu
    if cfg.quantization is not None:
        return QuantFormat(ExpertCodec(d, f, cfg.quantization, device, dtype, clamped))
    return FloatFormat(d, f, dtype, clamped)


def expert_nbytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one packed expert of `cfg` computing in `dtype`."""
    fmt = expert_format(cfg, torch.device("meta"), dtype)
    return fmt.numel * fmt.storage_dtype.itemsize
