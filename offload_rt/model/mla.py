"""Multi-head latent attention (DeepSeek-V2/V3), computed in the latent space.

A token's keys and values come from one compressed latent c = RMSNorm(W_dkv x) (kv_lora_rank
R values) and one rotary key k_r shared by every head (qk_rope_head_dim values); the KV cache
holds those R + rope values a token a layer, not H full keys and values. Instead of expanding
the cache into keys and values at every step (transformers' `expand_kv`), the up-projections
are absorbed: head h's score is (q_nope_h W_uk_h) · c + q_rope_h · k_r and its output
W_uv_h (Σ p · c), so a step costs O(S · R) per head, whatever the context holds.
Rotary: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3)...; q and k are rotated alike
and meet only in a dot product, so the pairs are taken apart into halves first and rotated
as Llama's halves are. References: `DeepseekV2Attention`, `DeepseekV3Attention`.
Shape legend: B rows, T new tokens, S key positions, D hidden, H heads, R kv_lora_rank,
N qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload_rt.model.kvcache import KVCache, RingStep
from offload_rt.model.layers import apply_rope, linear, rms_norm


@dataclass(frozen=True)
class MLASpec:
    heads: int  # H
    kv_lora_rank: int  # R
    nope_dim: int  # N
    rope_dim: int  # P
    v_dim: int  # V
    eps: float  # of the latent norms
    scale: float  # softmax scale: (N + P)^-0.5, times YaRN's mscale² where configured
    interleaved: bool = True  # rotary pairs interleaved (DeepSeek's release), else halves


@dataclass(frozen=True)
class MLAWeights:
    wkv_a: torch.Tensor  # (R + P, D): the latent and the rotary key
    kv_a_norm: torch.Tensor  # (R,)
    w_uk: torch.Tensor  # (H, N, R): kv_b_proj's key rows, per head
    w_uv: torch.Tensor  # (H, V, R): its value rows
    wo: torch.Tensor  # (D, H V)
    wq: torch.Tensor | None = None  # (H (N + P), D) without a query latent (V2-Lite)
    wq_a: torch.Tensor | None = None  # (q_lora_rank, D)
    q_a_norm: torch.Tensor | None = None  # (q_lora_rank,)
    wq_b: torch.Tensor | None = None  # (H (N + P), q_lora_rank)
    bq_a: torch.Tensor | None = None  # attention_bias: q_a_proj's, kv_a_proj's, o_proj's
    bkv_a: torch.Tensor | None = None
    bo: torch.Tensor | None = None


def _halves(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x0, x1), (x2, x3), ... -> (x0, x2, ..., x1, x3, ...)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def _queries(x: torch.Tensor, w: MLAWeights, spec: MLASpec) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, N + P)."""
    if w.wq is not None:
        q = linear(x, w.wq)
    else:
        assert w.wq_a is not None and w.q_a_norm is not None and w.wq_b is not None
        q = linear(rms_norm(linear(x, w.wq_a, w.bq_a), w.q_a_norm, spec.eps), w.wq_b)
    b, t, _ = x.shape
    return q.view(b, t, spec.heads, spec.nope_dim + spec.rope_dim).transpose(1, 2)


def mla_attention(
    x: torch.Tensor,
    w: MLAWeights,
    spec: MLASpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor,
    cache: KVCache,
    layer: int,
    kv_len: int,
    mask: torch.Tensor | None,
    start: int | None,
    ring: RingStep | None = None,
) -> torch.Tensor:
    """x: (B, T, D) -> (B, T, D), `attention`'s contract: the cache layer's "keys" hold the
    latents (B, 1, S, R), its "values" the rotary keys (B, 1, S, P)."""
    b, t, _ = x.shape
    q = _queries(x, w, spec)
    q_nope, q_rope = q.split([spec.nope_dim, spec.rope_dim], dim=-1)
    latent, k_rope = linear(x, w.wkv_a, w.bkv_a).split([spec.kv_lora_rank, spec.rope_dim], -1)
    latent = rms_norm(latent, w.kv_a_norm, spec.eps)[:, None]  # (B, 1, T, R)
    k_rope = k_rope[:, None]  # (B, 1, T, P)
    if spec.interleaved:
        q_rope, k_rope = _halves(q_rope), _halves(k_rope)
    q_rope, k_rope = apply_rope(q_rope, *rope), apply_rope(k_rope, *rope)
    cache.write(layer, positions, latent, k_rope, start)
    latents = cache.keys[layer][:, :, :kv_len]  # (B, 1, S, R)
    rope_keys = cache.values[layer][:, :, :kv_len]  # (B, 1, S, P)
    q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w.w_uk)  # (B, H, T, R)
    scores = q_latent @ latents.transpose(-1, -2) + q_rope @ rope_keys.transpose(-1, -2)
    scores = scores * spec.scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)
    out = torch.einsum("bhtr,hvr->bthv", probs @ latents, w.w_uv)  # (B, T, H, V)
    return linear(out.reshape(b, t, spec.heads * spec.v_dim), w.wo, w.bo)
