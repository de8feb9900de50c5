"""The Mixtral decoder: embeddings, layers of attention + MoE, final norm, lm_head.

Pure math over weights it is given and an `ExpertBackend` for the experts; it reads no file and
places nothing on a device. Reference: `MixtralForCausalLM` in transformers.
Shape legend: B rows, T new tokens per row, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload_rt.config import ModelConfig
from offload_rt.model.layers import (
    AttentionWeights,
    KVCache,
    RopeTables,
    attention,
    attention_mask,
    linear,
    rms_norm,
)
from offload_rt.model.moe import ExpertBackend, moe_block


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # (D,)
    attn: AttentionWeights
    post_attn_norm: torch.Tensor  # (D,)
    router: torch.Tensor  # (E, D)


@dataclass(frozen=True)
class DenseWeights:
    """Every weight but the experts'."""

    embed: torch.Tensor  # (V, D)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (D,)
    lm_head: torch.Tensor  # (V, D); the embedding itself when tied


class MixtralModel:
    def __init__(
        self, cfg: ModelConfig, weights: DenseWeights, backend: ExpertBackend, rope: RopeTables
    ) -> None:
        self.cfg = cfg
        self.weights = weights
        self.backend = backend
        self.rope = rope

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache.allocate(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            self.weights.embed.device,
            self.weights.embed.dtype,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        token_mask: torch.Tensor | None = None,
        start: int | None = None,
    ) -> torch.Tensor:
        """tokens, positions: (B, T); returns the final-normed hidden states (B, T, D).

        kv_len: one past the largest position (the caller knows it without a device sync).
        token_mask: (B, T) bool, False for padding and finished rows: their tokens still pass
        through attention (cheap) but are never sent to an expert.
        start: given when every row holds positions start .. start+T-1 (a prefill from 0, a
        decode step of rows of one length), which makes cache writes and masks cheaper.
        """
        c = self.cfg
        h = F.embedding(tokens, self.weights.embed)  # (B, T, D)
        mask = attention_mask(positions, kv_len, c.sliding_window, start)
        rope = self.rope.at(positions, h.dtype)  # shared by every layer
        live = None if token_mask is None or bool(token_mask.all()) else token_mask.reshape(-1)
        for i, lw in enumerate(self.weights.layers):
            a = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            h = h + attention(
                a,
                lw.attn,
                c.num_attention_heads,
                c.num_key_value_heads,
                rope,
                positions,
                cache,
                i,
                kv_len,
                mask,
                start,
            )
            m = rms_norm(h, lw.post_attn_norm, c.rms_norm_eps).reshape(-1, c.hidden_size)
            h = h + self._moe(m, lw.router, i, live).view_as(h)
        return rms_norm(h, self.weights.norm, c.rms_norm_eps)

    def _moe(
        self, x: torch.Tensor, router: torch.Tensor, layer: int, live: torch.Tensor | None
    ) -> torch.Tensor:
        top_k = self.cfg.num_experts_per_tok
        if live is None:
            return moe_block(x, router, top_k, layer, self.backend)
        out = torch.zeros_like(x)
        out[live] = moe_block(x[live], router, top_k, layer, self.backend)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, D) final-normed hidden -> (N, V) logits."""
        return linear(hidden, self.weights.lm_head)
