"""An expert's FFN as the runtime computes it: weights in the compute dtype, and the math.

Two kinds, chosen by the family:
- `SwiGLU`: w2(silu(w1 x) * w3 x), no biases (Mixtral, Qwen, OLMoE, DeepSeek, GLM);
- `ClampedSwiGLU`: GPT-OSS's expert, with biases and a clamped gate,
  g = min(w1 x + b1, limit), u = clamp(w3 x + b3, ±limit), w2((u + 1) · g · sigmoid(α g)) + b2.
Both keep gate and up stacked into one (2F, D) matrix, so the up-projection is one matmul, and
split into `up` and `down`, so that an expert still arriving can start on w13 before its w2 has
landed. References: `MixtralBlockSparseTop2MLP` and `GptOssExperts` in transformers.
Shape legend: n tokens, D hidden, F the expert's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from offload_rt.model import onerow
from offload_rt.model.layers import linear


class ExpertFFN(Protocol):
    """One expert's weights, ready to compute (views of a slot, or scratch)."""

    @property
    def w13(self) -> torch.Tensor:
        """(2F, D): gate rows, then up rows."""
        ...

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) -> the activation (n, F)."""
        ...

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """(n, F) -> (n, D)."""
        ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SwiGLU:
    w13: torch.Tensor  # (2F, D): gate rows, then up rows
    w2: torch.Tensor  # (D, F)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.w13)  # (n, 2F)
        one_row = onerow.swiglu(y)  # compiled for one row on the CPU
        if one_row is not None:
            return one_row
        gate, up = y.chunk(2, dim=-1)  # (n, F) each
        return F.silu(gate) * up

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.w2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


@dataclass(frozen=True)
class ClampedSwiGLU:
    w13: torch.Tensor  # (2F, D): gate rows, then up rows
    b13: torch.Tensor  # (2F,)
    w2: torch.Tensor  # (D, F)
    b2: torch.Tensor  # (D,)
    limit: float  # the gate is clamped above at limit, the up-projection to ±limit
    alpha: float  # sigmoid gain (1.702 in GPT-OSS)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (linear(x, self.w13) + self.b13).chunk(2, dim=-1)  # (n, F) each
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.w2) + self.b2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))
