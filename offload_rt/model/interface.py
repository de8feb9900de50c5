"""What a decoder is made of and what the engine sees of it: the weights a family hands the
shared `MoEDecoder` (`DenseWeights`, its layers' `LayerWeights` and `MoEWeights`), the math
knobs it sets (`DecoderSpec`) and the `DecoderModel` protocol the engine, the scheduler and the
server use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from offload_rt.config import ModelConfig
from offload_rt.grid import ExpertGrid
from offload_rt.model.ffn import SwiGLU
from offload_rt.model.kvcache import KVCache
from offload_rt.model.layers import AttentionSpec, AttentionWeights
from offload_rt.model.mla import MLASpec, MLAWeights
from offload_rt.model.moe import ExpertBackend, ExpertPrefetcher, RouterSpec

# where the next MoE layer's router is applied to guess its experts while layer L runs: the
# hidden state after L's attention (earliest: L's experts still to run) or after L's MoE
# output (closest to what the next layer will see), or both, the later guess correcting the first
PREDICT_FROM = ("attention", "moe", "both")


# a SwiGLU MLP the coordinator runs itself: a dense layer's, or a shared expert
DenseMLP = SwiGLU


@dataclass(frozen=True)
class MoEWeights:
    router: torch.Tensor  # (E, D)
    router_bias: torch.Tensor | None = None  # (E,) joins the logits (GPT-OSS)
    correction: torch.Tensor | None = None  # (E,) joins the scores to choose (DeepSeek-V3)
    shared: DenseMLP | None = None  # an expert every token uses (Qwen2-MoE)
    shared_gate: torch.Tensor | None = None  # (1, D): shared output · sigmoid(gate x)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    attn: AttentionWeights | MLAWeights
    post_attn_norm: torch.Tensor  # (D,)
    mlp: MoEWeights | DenseMLP  # routed experts (+ shared), or a dense MLP


@dataclass(frozen=True)
class DenseWeights:
    """Every weight but the routed experts'."""

    embed: torch.Tensor  # (V, D)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (D,)
    lm_head: torch.Tensor  # (V, D); the embedding itself when tied


@dataclass(frozen=True)
class DecoderSpec:
    """The math knobs a family sets beyond the shared config."""

    attention: AttentionSpec | MLASpec  # grouped-query, or latent (DeepSeek)
    router: RouterSpec  # scores, groups, renormalisation, scale
    # per layer: the window of a sliding-window layer whose KV cache is a ring of that many
    # positions (GPT-OSS), or None for full attention; None: every layer full
    ring_windows: tuple[int | None, ...] | None = None


class DecoderModel(Protocol):
    """What the engine, the scheduler and the server see of a model of any family."""

    config: ModelConfig
    grid: ExpertGrid
    backend: ExpertBackend
    prefetcher: ExpertPrefetcher | None

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, batch: int, max_len: int) -> KVCache: ...

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        token_mask: torch.Tensor | None = None,
        start: int | None = None,
    ) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def step_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        token_mask: torch.Tensor | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, list[int] | None]: ...

    def step_token(
        self, token: int, position: int, cache: KVCache
    ) -> tuple[torch.Tensor, int] | None: ...

    def greedy_steps(
        self, token: int, position: int, cache: KVCache, n: int, stops: torch.Tensor
    ) -> list[int] | None: ...
