"""Rotary frequencies: Llama's, and YaRN's scaled ones (GPT-OSS, DeepSeek-V3).

Reference: transformers' `_compute_default_rope_parameters` and `_compute_yarn_parameters`.
"""

from __future__ import annotations

import math

import torch

from offload_rt.config import YarnConfig


def default_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(Hd/2,) float32: theta^(-2i/Hd)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (theta ** (exponent / head_dim))


def mscale(scale: float, gain: float = 1.0) -> float:
    """YaRN's attention gain for a context extended `scale` times (DeepSeek's `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * gain * math.log(scale) + 1.0


def yarn_attention_factor(yarn: YarnConfig) -> float:
    """The factor YaRN scales cos and sin by (so attention logits by its square)."""
    if yarn.attention_factor is not None:
        return yarn.attention_factor
    if yarn.mscale and yarn.mscale_all_dim:
        return mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim)
    return mscale(yarn.factor)


def _correction_dim(rotations: float, dim: int, theta: float, context: int) -> float:
    """The dimension whose wavelength fits `rotations` times into `context` positions."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(
    head_dim: int, theta: float, yarn: YarnConfig, device: torch.device
) -> tuple[torch.Tensor, float]:
    """(Hd/2,) float32 frequencies and the attention factor. Dimensions that turn fast
    (more than beta_fast rotations over the original context) keep their frequency, slow ones
    (fewer than beta_slow) are interpolated by `factor`, with a linear ramp between."""
    context = yarn.original_max_position_embeddings
    low = _correction_dim(yarn.beta_fast, head_dim, theta, context)
    high = _correction_dim(yarn.beta_slow, head_dim, theta, context)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as the reference: no division by zero
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    extrapolate = 1 - ramp.clamp(0, 1)  # 1: keep the frequency, 0: interpolate
    base = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)
    inv_freq = (1.0 / (yarn.factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    return inv_freq, yarn_attention_factor(yarn)
