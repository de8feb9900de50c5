"""Dense decoder math: RMSNorm, rotary embeddings, grouped-query attention over a KV cache
(with the q/k/v biases, q/k norms, clipping and sinks that families add).

Reference: the eager attention of transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS.
Shape legend:
B batch rows, T new tokens per row, S key positions, D hidden, H query heads, K key/value heads,
G = H / K queries per key/value head, Hd head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from offload_rt.config import YarnConfig
from offload_rt.model.cpukernels import gemv
from offload_rt.model.kvcache import KVCache, RingStep
from offload_rt.model.rope import default_inv_freq, yarn_inv_freq


class PackedMatrix(Protocol):
    """A weight kept in a packed format (quantized codes) that multiplies without a float copy
    where it can (`experts/quant.py`)."""

    shape: torch.Size  # (N, K) of the matrix it stands for
    dtype: torch.dtype  # the compute dtype
    device: torch.device

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> (M, N)."""
        ...

    def affine(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Its bits (8 or 4) and affine codes, scales and offsets (`experts/quant.py`'s layout)
        where it is that format, else None."""
        ...


def linear(
    x: torch.Tensor, w: torch.Tensor | PackedMatrix, b: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T (+ b). A packed `w` computes itself. On the CPU: one row
    through a compiled matrix-vector kernel (`cpukernels.gemv`, for matrices large enough to
    pay for a call); 4+ rows as (w @ x^T)^T: MKL's kernel for that form runs 1.2-1.5x faster
    there for the wide matrices of experts and lm_head (measured on this project's CI machine;
    below 4 rows F.linear's is as fast)."""
    if not isinstance(w, torch.Tensor):
        y = w.product(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b
    if x.numel() == x.shape[-1]:
        y = gemv(x.reshape(1, -1), w)
        if y is not None:
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
    if b is None and x.dim() == 2 and x.shape[0] >= 4 and x.device.type == "cpu":
        return (w @ x.t()).t()
    return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # in float32 whatever the model dtype, then back: as the reference does
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@dataclass(frozen=True)
class RopeTables:
    cos: torch.Tensor  # (max_positions, Hd) float32
    sin: torch.Tensor  # (max_positions, Hd) float32

    @classmethod
    def build(
        cls,
        head_dim: int,
        theta: float,
        max_positions: int,
        device: torch.device,
        yarn: YarnConfig | None = None,
    ) -> RopeTables:
        """Llama's rotary tables, or YaRN's (its frequencies, and cos and sin scaled by its
        attention factor, as transformers' `_compute_yarn_parameters`)."""
        inv_freq, scale = default_inv_freq(head_dim, theta, device), 1.0  # (Hd/2,)
        if yarn is not None:
            inv_freq, scale = yarn_inv_freq(head_dim, theta, yarn, device)
        pos = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # (P, Hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, Hd)
        return cls(emb.cos() * scale, emb.sin() * scale)

    def row(self, position: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at one position, (Hd,) each, contiguous (a one-row step's C++ reads them)."""
        return self.cos[position].to(dtype), self.sin[position].to(dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at `positions` (B, T), shaped (B, 1, T, Hd) to broadcast over heads."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, Hd); cos, sin: (B, 1, T, Hr) from `RopeTables.at`. Tables narrower
    than the head (GLM's partial rotary) rotate its first Hr dimensions and pass the rest."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


@dataclass(frozen=True)
class AttentionWeights:
    wqkv: torch.Tensor  # (H * Hd + 2 * K * Hd, D): q, k and v projections stacked, one matmul
    wo: torch.Tensor  # (D, H * Hd)
    bqkv: torch.Tensor | None = None  # (H * Hd + 2 * K * Hd,): q/k/v biases (Qwen2-MoE)
    bo: torch.Tensor | None = None  # (D,): output bias
    q_norm: torch.Tensor | None = None  # RMSNorm weight of q: (Hd,) per head, or (H * Hd,)
    k_norm: torch.Tensor | None = None  # of k: (Hd,) per head, or (K * Hd,) over all heads
    sinks: torch.Tensor | None = None  # (H,): a logit per head that joins each softmax (GPT-OSS)


@dataclass(frozen=True)
class AttentionSpec:
    heads: int  # H
    kv_heads: int  # K
    head_dim: int  # Hd
    eps: float  # of the q/k RMSNorms
    clip_qkv: float | None = None  # q, k, v clamped to ±clip after their norms (OLMoE)


def attention(
    x: torch.Tensor,
    w: AttentionWeights,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    cache: KVCache,
    layer: int,
    kv_len: int,
    mask: torch.Tensor | None,
    start: int | None,
    ring: RingStep | None = None,
) -> torch.Tensor:
    """x: (B, T, D) -> (B, T, D). Writes this step's keys/values into the cache.
    rope: cos, sin at `positions`, from `RopeTables.at`; mask from `attention_mask` for a full
    layer; a ring layer (sliding window) takes the forward's `ring` step and its mask instead.
    q/k norms: a (Hd,) weight normalises each head (Qwen3-MoE); a wider one the whole
    projection (OLMoE)."""
    qkv = linear(x, w.wqkv, w.bqkv)  # (B, T, (H + 2K) Hd)
    q, k, v = split_heads(qkv, w.q_norm, w.k_norm, spec, rope)
    out = attend(q, k, v, w.sinks, positions, cache, layer, kv_len, mask, start, ring)
    return linear(out, w.wo, w.bo)


def split_heads(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked projection (B, T, (H + 2K) Hd), biases added, -> q (B, H, T, Hd), k, v
    (B, K, T, Hd): q and k through their norms and rotated, q, k, v clipped."""
    b, t, _ = qkv.shape
    heads, kv_heads, hd = spec.heads, spec.kv_heads, spec.head_dim
    if q_norm is not None or spec.clip_qkv is not None:
        qkv = _normed_qkv(qkv, q_norm, k_norm, spec)
    qkv = qkv.view(b, t, heads + 2 * kv_heads, hd).transpose(1, 2)
    # rotate q and k in one go: (B, H + K, T, Hd)
    qk = apply_rope(qkv[:, : heads + kv_heads], *rope)
    q, k = qk.split([heads, kv_heads], dim=1)
    return q, k, qkv[:, heads + kv_heads :]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    positions: torch.Tensor,
    cache: KVCache,
    layer: int,
    kv_len: int,
    mask: torch.Tensor | None,
    start: int | None,
    ring: RingStep | None = None,
) -> torch.Tensor:
    """This step's k, v into the cache, then q (B, H, T, Hd) over the layer's keys: the heads'
    outputs side by side (B, T, H Hd)."""
    b, heads, t, hd = q.shape
    if cache.windows[layer] is None:
        cache.write(layer, positions, k, v, start)
        keys = cache.keys[layer][:, :, :kv_len]  # (B, K, S, Hd)
        values = cache.values[layer][:, :, :kv_len]
    else:  # the ring's old keys, then this step's: (B, K, W + T, Hd)
        assert ring is not None
        keys = torch.cat((cache.keys[layer], k), dim=2)
        values = torch.cat((cache.values[layer], v), dim=2)
        cache.ring_write(layer, ring, k, v)
        mask = ring.mask
    if sinks is None:
        # each key/value head serves H / K consecutive query heads, as the reference's repeat_kv
        out = _sdpa(q, keys, values, mask)
    else:
        out = _attend_with_sinks(q, keys, values, mask, sinks)
    return out.transpose(1, 2).reshape(b, t, heads * hd)


def _sdpa(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """torch's attention, except one query a row of a 16-bit model on the CPU: there its
    kernel runs 2-9x slower than the same attention widened to float32 first (32 heads of 32
    over 8 key heads, `benchmarks/bench_cpu_attention.py`: bfloat16 71 against 36 µs at 64
    keys, 1768 against 327 at 2048; float16 2986 against 317 at 2048), so that is what runs.
    Widening is exact, the float32 sums are at least as accurate as the 16-bit kernel's, and
    the output is rounded once to the model's dtype; prefill steps (many queries) are as fast
    either way and stay as they were."""
    if q.device.type == "cpu" and q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16):
        wide = (q.float(), keys.float(), values.float())
        out = F.scaled_dot_product_attention(*wide, attn_mask=mask, enable_gqa=True)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def _attend_with_sinks(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention where each head's sink logit joins every row's softmax and takes its
    share of the probability without adding a value (GPT-OSS's `eager_attention_forward`).
    q: (B, H, T, Hd), keys/values: (B, K, S, Hd), mask: (B, 1, T, S) or None -> (B, H, T, Hd)."""
    b, h, t, hd = q.shape
    kv, s = keys.shape[1], keys.shape[2]
    grouped = q.reshape(b, kv, (h // kv) * t, hd)  # head h uses kv head h // (H / K)
    scores = (grouped @ keys.transpose(-1, -2)).view(b, h, t, s) * hd**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat((scores, sinks.view(1, h, 1, 1).expand(b, h, t, 1).to(scores.dtype)), -1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :s]
    return (probs.reshape(b, kv, (h // kv) * t, s) @ values).view(b, h, t, hd)


def _normed_qkv(
    qkv: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    spec: AttentionSpec,
) -> torch.Tensor:
    """q and k through their RMSNorms, then q, k, v clamped, in the reference's order."""
    q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    if q_norm is not None and k_norm is not None:
        q, k = _qk_norm(q, q_norm, spec), _qk_norm(k, k_norm, spec)
    if spec.clip_qkv is not None:
        c = spec.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    return torch.cat((q, k, v), dim=-1)


def _qk_norm(x: torch.Tensor, weight: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    if weight.shape[0] != spec.head_dim:  # over the whole projection
        return rms_norm(x, weight, spec.eps)
    heads = x.view(*x.shape[:-1], -1, spec.head_dim)  # (B, T, heads, Hd)
    return rms_norm(heads, weight, spec.eps).flatten(-2)
