"""Dense weights quantized at load: attention projections, dense and shared MLPs and lm_head as
affine int8/int4 codes (the experts' format, `experts/quant.py`), as llama.cpp quantizes them
with its experts. `load(..., dense_quant="int8")` asks for it.

On the CPU a one-row product reads the codes through the compiled kernels of
`model/cpukernels.py`; more rows (a prefill), or another device, dequantize into a temporary
first. Embeddings (looked up, not multiplied), norms, routers, biases and DeepSeek's latent
attention (its weights are absorbed into other products) stay as loaded; so does any matrix
whose input width the group size does not divide. Outputs change by the quantization error,
which `offload-rt eval --against` measures.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import torch

from offload_rt.config import QuantConfig
from offload_rt.experts import hugepages
from offload_rt.experts.quant import QuantizedTensor, dequantize, quantize
from offload_rt.model.cpukernels import affine_gemv
from offload_rt.model.ffn import SwiGLU
from offload_rt.model.interface import DenseWeights, MoEWeights
from offload_rt.model.layers import AttentionWeights, linear

FORMATS = {"int8": 8, "int4": 4}


class QuantizedDense:
    """One dense weight (N, K) as affine codes, multiplied without a float copy at one row."""

    def __init__(self, w: torch.Tensor, quant: QuantConfig, name: str) -> None:
        self.q: QuantizedTensor = quantize(w, quant, name)
        self.quant = quant
        self.shape, self.dtype, self.device = w.shape, w.dtype, w.device

    def affine(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        q = self.q
        return self.quant.bits, q.qweight, q.scales, q.offsets

    def product(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        y = affine_gemv(x, q.qweight, q.scales, q.offsets, self.quant.bits)
        return linear(x, dequantize(q, self.quant, x.dtype)) if y is None else y


def dense_quant_config(name: str, group_size: int, option: str = "dense_quant") -> QuantConfig:
    if name not in FORMATS:
        raise ValueError(f"{option} must be one of {sorted(FORMATS)}, got {name!r}")
    return QuantConfig(FORMATS[name], group_size)


def quantize_dense(
    weights: DenseWeights, quant: QuantConfig, lm_head: QuantConfig | None = None
) -> DenseWeights:
    """`weights` with every dense matrix that `linear` multiplies replaced by its codes; lm_head
    in `lm_head`'s format where given (llama.cpp's q4_0 keeps it in 6 bits: the logits are the
    most sensitive to it), else `quant`'s."""

    def matrix(
        w: torch.Tensor, name: str, quant: QuantConfig = quant
    ) -> torch.Tensor | QuantizedDense:
        if w.dim() != 2 or w.shape[1] % quant.group_size or not w.is_floating_point():
            return w
        if quant.bits == 4 and (w.shape[1] // quant.group_size) % 2:
            return w  # int4 packs a row's halves together: an even number of groups
        return QuantizedDense(w, quant, name)

    def mlp(m: object, name: str) -> object:
        if isinstance(m, SwiGLU):
            return SwiGLU(matrix(m.w13, f"{name}.w13"), matrix(m.w2, f"{name}.w2"))  # type: ignore[arg-type]
        if isinstance(m, MoEWeights) and m.shared is not None:
            return replace(m, shared=mlp(m.shared, f"{name}.shared"))
        return m

    layers = []
    for i, layer in enumerate(weights.layers):
        attn = layer.attn
        if isinstance(attn, AttentionWeights):
            wqkv, wo = matrix(attn.wqkv, f"layers.{i}.wqkv"), matrix(attn.wo, f"layers.{i}.wo")
            attn = replace(attn, wqkv=wqkv, wo=wo)
        layers.append(replace(layer, attn=attn, mlp=mlp(layer.mlp, f"layers.{i}.mlp")))
    lm_head = matrix(weights.lm_head, "lm_head", lm_head or quant)
    return replace(weights, layers=layers, lm_head=lm_head)


def dense_bytes(weights: DenseWeights) -> int:
    """Bytes of the dense weights as held (codes, scales and offsets where quantized)."""
    seen: set[int] = set()

    def walk(obj: object) -> int:
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() in seen:
                return 0
            seen.add(obj.data_ptr())
            return obj.numel() * obj.element_size()
        if isinstance(obj, QuantizedDense):
            return walk(obj.q.qweight) + walk(obj.q.scales) + walk(obj.q.offsets)
        if isinstance(obj, (list, tuple)):
            return sum(walk(o) for o in obj)
        if is_dataclass(obj):
            return sum(walk(getattr(obj, f.name)) for f in fields(obj))
        return 0

    return walk(weights)


def on_huge_pages(weights: DenseWeights) -> DenseWeights:
    """`weights` with every large CPU tensor (codes included) copied into memory on huge pages
    (`experts/hugepages.py`): a one-row product streams each once a step, and on 4 KiB pages
    it misses the TLB every 4 KiB. Layer by layer, each layer's old tensors let go before the
    next is copied (the layers list is replaced in place), so the load holds at most one
    layer, or the embedding and lm_head, twice. A tensor used twice (a tied lm_head) is
    copied once."""
    copies: dict[int, torch.Tensor] = {}

    def walk(obj: object) -> object:
        if isinstance(obj, torch.Tensor):
            key = obj.data_ptr()
            if key not in copies:
                copies[key] = hugepages.copy(obj)
            return copies[key]
        if isinstance(obj, QuantizedDense):
            obj.q = walk(obj.q)  # type: ignore[assignment]
            return obj
        if isinstance(obj, list):
            return [walk(o) for o in obj]
        if is_dataclass(obj) and not isinstance(obj, type):
            return replace(obj, **{f.name: walk(getattr(obj, f.name)) for f in fields(obj)})
        return obj

    for i, layer in enumerate(weights.layers):
        weights.layers[i] = walk(layer)  # type: ignore[assignment]
        copies.clear()  # layers share no tensor
    embed = walk(weights.embed)
    return replace(weights, embed=embed, norm=walk(weights.norm), lm_head=walk(weights.lm_head))
