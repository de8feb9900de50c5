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
from offload_rt.model.moe import ExpertBackend, ExpertPrefetcher, moe_block, predict_experts

# where layer L+1's router is applied to guess its experts while layer L runs: the hidden state
# after L's attention (earliest: L's experts still to run) or after L's MoE output (closest to
# what L+1 will see: only L+1's attention left), or both, the later guess correcting the first
PREDICT_FROM = ("attention", "moe", "both")


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
        self,
        cfg: ModelConfig,
        weights: DenseWeights,
        backend: ExpertBackend,
        rope: RopeTables,
        prefetcher: ExpertPrefetcher | None = None,
        predict_from: str = "both",
    ) -> None:
        if predict_from not in PREDICT_FROM:
            raise ValueError(f"predict_from must be one of {PREDICT_FROM}, got {predict_from!r}")
        self.cfg = cfg
        self.weights = weights
        self.backend = backend
        self.rope = rope
        self.prefetcher = prefetcher  # None: no guesses of the next layer's experts
        self.predict_from = predict_from
        # per layer, the router with its MoE input norm's weight folded in (E, D): a single
        # token's guess is then one matrix-vector product, since the norm's 1/rms factor and
        # the softmax are monotonic and leave the order of the router's logits unchanged
        self._guess_routers = [lw.router * lw.post_attn_norm for lw in weights.layers]

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
            self._predict(h, i + 1, live, "attention")
            m = rms_norm(h, lw.post_attn_norm, c.rms_norm_eps).reshape(-1, c.hidden_size)
            h = h + self._moe(m, lw.router, i, live).view_as(h)
            self._predict(h, i + 1, live, "moe")
        return rms_norm(h, self.weights.norm, c.rms_norm_eps)

    def _predict(self, h: torch.Tensor, layer: int, live: torch.Tensor | None, at: str) -> None:
        """Hand the prefetcher layer `layer`'s router's choice on h (B, T, D), as that layer
        would make it with h as its MoE input. Reads h, changes nothing."""
        if self.prefetcher is None or self.predict_from not in (at, "both"):
            return
        if layer >= len(self.weights.layers):
            return
        c = self.cfg
        x = h.reshape(-1, c.hidden_size)  # (N, D)
        if live is not None:
            x = x[live]
        if x.shape[0] == 1:
            # one matrix-vector product and one sync; ranking 8 floats in Python beats topk
            # (measured 11 against 30-45 µs a guess, with fewer stalls on a loaded CPU)
            logits = torch.mv(self._guess_routers[layer], x[0]).tolist()  # (E,)
            order = sorted(range(len(logits)), key=logits.__getitem__, reverse=True)
            ranked = order[: c.num_experts_per_tok]
        elif x.shape[0]:
            lw = self.weights.layers[layer]
            normed = rms_norm(x, lw.post_attn_norm, c.rms_norm_eps)
            ranked = predict_experts(normed, lw.router, c.num_experts_per_tok)
        else:
            return
        # the early guess of "both" fetches only the likelier half of what it names (on the
        # benchmark model a token's first choice is right 3 times in 4, its second 1 in 2):
        # a wrong load that has started cannot be taken back when the later guess corrects it
        early = at == "attention" and self.predict_from == "both"
        self.prefetcher.prefetch(layer, ranked, -(-len(ranked) // 2) if early else None)

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
