"""The MoE decoder the softmax-routed families share: embeddings, layers of attention (full or
sliding-window) and an MoE block (routed experts, maybe a gated shared expert) or a dense MLP,
final norm, lm_head.

Pure math over weights it is given and an `ExpertBackend` for the routed experts; it reads no
file and places nothing on a device. A family (`offload_rt/models/`) parses its config, names
its tensors and builds one. References: `MixtralForCausalLM`, `Qwen2MoeForCausalLM`,
`Qwen3MoeForCausalLM`, `OlmoeForCausalLM`, `GptOssForCausalLM` in transformers.
Shape legend: B rows, T new tokens per row, D hidden, V vocabulary, F an MLP's width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offload_rt.config import ModelConfig
from offload_rt.grid import ExpertKey
from offload_rt.model import onequery, onerow, rowlayer, rowstep
from offload_rt.model.cpusteps import CppSteps
from offload_rt.model.interface import (
    DecoderSpec,
    DenseMLP,
    DenseWeights,
    LayerWeights,
    MoEWeights,
)
from offload_rt.model.kvcache import KVCache, RingStep, attention_mask
from offload_rt.model.layers import (
    AttentionSpec,
    AttentionWeights,
    RopeTables,
    attend,
    attention,
    linear,
    rms_norm,
)
from offload_rt.model.mla import MLASpec, mla_attention
from offload_rt.model.moe import (
    ExpertBackend,
    ExpertPrefetcher,
    moe_block,
    predict_experts,
)


class MoEDecoder:
    def __init__(
        self,
        cfg: ModelConfig,
        spec: DecoderSpec,
        weights: DenseWeights,
        backend: ExpertBackend,
        rope: RopeTables,
        prefetcher: ExpertPrefetcher | None = None,
    ) -> None:
        self.config = cfg
        self.grid = cfg.grid
        self.spec = spec
        self.weights = weights
        self.backend = backend
        self.rope = rope
        self.prefetcher = prefetcher  # None: no guesses of the next layer's experts
        # per MoE layer, the router with its MoE input norm's weight folded in (E, D): a
        # single token's guess is then one matrix-vector product, since the norm's 1/rms
        # factor and the softmax are monotonic and leave the order of the router's logits
        self._guess_routers = {
            i: lw.mlp.router * lw.post_attn_norm
            for i, lw in enumerate(weights.layers)
            if isinstance(lw.mlp, MoEWeights)
        }
        self._cpp = CppSteps(  # one-row CPU steps through the C++ layers
            spec.attention, spec.router, cfg.experts_per_layer, cfg.rms_norm_eps, rope,
            lambda: (self.weights.norm, self.weights.lm_head), backend,
            lambda dtype: [self._layer_plan(lw, dtype) for lw in self.weights.layers],
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c, spec = self.config, self.spec.attention
        if isinstance(spec, MLASpec):  # a latent and a rotary key a token: no heads
            return KVCache.allocate(
                c.num_hidden_layers,
                batch,
                1,
                max_len,
                spec.kv_lora_rank,
                self.weights.embed.device,
                self.weights.embed.dtype,
                value_dim=spec.rope_dim,
            )
        return KVCache.allocate(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            max_len,
            c.head_dim,
            self.weights.embed.device,
            self.weights.embed.dtype,
            self.spec.ring_windows,
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
        hidden = self._forward(tokens, positions, cache, kv_len, token_mask, start, False)[0]
        assert hidden is not None
        return hidden

    def step_logits(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        token_mask: torch.Tensor | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, list[int] | None]:
        """`forward` then `logits` of each row's last position: (B, V), and each row's
        highest-scoring token where the step computed it alongside (as torch.argmax), else
        None. For one token of one sequence on the CPU the head is part of the step's C++
        call (`model/rowstep.py`), which finds that token too."""
        hidden, ends = self._forward(tokens, positions, cache, kv_len, token_mask, start, True)
        if ends is not None:
            return ends.logits, [ends.best]
        assert hidden is not None
        return self.logits(hidden[:, -1]), None

    def step_token(
        self, token: int, position: int, cache: KVCache
    ) -> tuple[torch.Tensor, int] | None:
        """`step_logits` for token id `token` of a one-row cache at `position` (the cache
        holding the row's earlier positions): its logits (1, V) and their argmax, where the
        CPU's whole-step call serves the step (`CppSteps.token_logits`: from the token id,
        without a torch operation around the call); else None, nothing done (then the caller
        takes `step_logits`)."""
        window = self.config.sliding_window
        if self.prefetcher is not None or (window is not None and position >= window):
            return None  # guesses between layers; past the window a mask hides keys
        ends = self._cpp.token_logits(self.weights.embed, token, cache, position)
        return None if ends is None else (ends.logits, ends.best)

    def greedy_steps(
        self, token: int, position: int, cache: KVCache, n: int, stops: torch.Tensor
    ) -> list[int] | None:
        """Up to n greedy steps of a one-row cache where `step_token` would serve them: token
        `token` at `position`, then each step's argmax at the next position, ending after one
        of `stops` (int64 ids), within the sliding window; the argmaxes (the tokens each step
        chooses greedily); else None, nothing done."""
        window = self.config.sliding_window
        if window is not None:
            n = min(n, window - position)
        if n < 1 or self.prefetcher is not None:
            return None
        return self._cpp.greedy(self.weights.embed, token, cache, position, n, stops)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        token_mask: torch.Tensor | None,
        start: int | None,
        head: bool,
    ) -> tuple[torch.Tensor | None, rowstep.Logits | None]:
        """`forward`'s final-normed hidden states, or, where `head` asks and the step's layers
        run in C++, None and the step's logits."""
        c = self.config
        h = F.embedding(tokens, self.weights.embed)  # (B, T, D)
        mask = attention_mask(positions, kv_len, c.sliding_window, start)
        live = None if token_mask is None or bool(token_mask.all()) else token_mask.reshape(-1)
        ring = None
        if cache.ring_pos is not None:
            ring = cache.ring_step(positions, None if live is None else token_mask)
        if live is None and isinstance(self.spec.attention, AttentionSpec):
            if onerow.applies(h, c.hidden_size):
                out = self._one_row(h, positions, cache, kv_len, mask, start, ring, head)
                if ring is not None:
                    cache.ring_advance(ring, positions)
                return out
        rope = self.rope.at(positions, h.dtype)  # shared by every layer
        attend = mla_attention if isinstance(self.spec.attention, MLASpec) else attention
        for i, lw in enumerate(self.weights.layers):
            a = rms_norm(h, lw.input_norm, c.rms_norm_eps)
            h = h + attend(  # type: ignore[operator]
                a,
                lw.attn,
                self.spec.attention,
                rope,
                positions,
                cache,
                i,
                kv_len,
                mask,
                start,
                ring,
            )
            upcoming = self.grid.next_layer(i)
            if isinstance(lw.mlp, DenseMLP):
                m = rms_norm(h, lw.post_attn_norm, c.rms_norm_eps).reshape(-1, c.hidden_size)
                h = h + lw.mlp(m).view_as(h)
                continue
            self._predict(h, upcoming, live, "attention")
            m = rms_norm(h, lw.post_attn_norm, c.rms_norm_eps).reshape(-1, c.hidden_size)
            h = h + self._moe(m, lw.mlp, i, live).view_as(h)
            self._predict(h, upcoming, live, "moe")
        if ring is not None:
            cache.ring_advance(ring, positions)
        return rms_norm(h, self.weights.norm, c.rms_norm_eps), None

    def _one_row(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int,
        mask: torch.Tensor | None,
        start: int | None,
        ring: RingStep | None,
        head: bool,
    ) -> tuple[torch.Tensor | None, rowstep.Logits | None]:
        """`_forward` for one token of one sequence on the CPU: the same math with the work
        between the matrix products compiled (`model/onerow.py`). h: the embedded token (1, 1,
        D); grouped-query attention only."""
        c, spec = self.config, self.spec.attention
        assert isinstance(spec, AttentionSpec)
        eps = c.rms_norm_eps
        if start is not None and mask is None and self.prefetcher is None:
            if self._cpp.takes(cache, h.dtype):
                return self._cpp.run(h, cache, start, head)
        rope = self.rope.at(positions, h.dtype)
        moe_out: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None] | None = None
        for i, lw in enumerate(self.weights.layers):
            w = lw.attn
            assert isinstance(w, AttentionWeights)
            h, a = onerow.enter(h, lw.input_norm, eps, moe_out)
            moe_out = None
            qkv = linear(a, w.wqkv)
            if start is not None and onequery.applies(cache, i, qkv.dtype, w.sinks, mask):
                heads = self._attend_one(qkv, w, rope, cache, i, start, kv_len)
            else:
                q, k, v = onerow.heads(qkv, w, spec, rope)
                heads = attend(q, k, v, w.sinks, positions, cache, i, kv_len, mask, start, ring)
            o = linear(heads, w.wo)
            upcoming = self.grid.next_layer(i)
            mlp = lw.mlp
            if isinstance(mlp, DenseMLP):
                h = h + (o if w.bo is None else o + w.bo)
                m = rms_norm(h, lw.post_attn_norm, eps).reshape(-1, c.hidden_size)
                h = h + mlp(m).view_as(h)
                continue
            h, m, weights, experts = onerow.leave(
                h, o, w.bo, lw.post_attn_norm, eps, mlp.router, self.spec.router,
                mlp.router_bias, mlp.correction,
            )  # fmt: skip
            self._predict(h, upcoming, None, "attention")
            outputs = self.backend.run({ExpertKey(i, e): m for e in experts})
            shared = _shared_expert(m, mlp)
            moe_out = ([outputs[ExpertKey(i, e)] for e in experts], weights, shared)
            if self.prefetcher is not None and self.prefetcher.predict_from != "attention":
                h = onerow.enter(h, self.weights.norm, eps, moe_out)[0]
                moe_out = None
                self._predict(h, upcoming, None, "moe")
        return onerow.enter(h, self.weights.norm, eps, moe_out)[1], None

    def _layer_plan(self, lw: LayerWeights, dtype: torch.dtype) -> rowlayer.LayerPlan | None:
        mlp = lw.mlp
        if not isinstance(mlp, MoEWeights):
            return None
        extras = (mlp.router_bias, mlp.correction, mlp.shared, mlp.shared_gate)
        return rowlayer.plan(
            lw.attn, self.spec.attention, lw.input_norm, lw.post_attn_norm, mlp.router,
            self.spec.router, extras, dtype,
        )  # fmt: skip

    def _attend_one(
        self,
        qkv: torch.Tensor,
        w: AttentionWeights,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        position: int,
        kv_len: int,
    ) -> torch.Tensor:
        """One token's attention from its stacked q/k/v product (1, 1, (H + 2K) Hd) in C++
        (`model/onequery.py`): rotated there where no bias, norm or clipping comes first,
        else after the compiled glue's `heads`."""
        spec = self.spec.attention
        assert isinstance(spec, AttentionSpec)
        if w.bqkv is None and w.q_norm is None and w.k_norm is None and spec.clip_qkv is None:
            flat = qkv.view(-1)
            q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            q, k, v = flat.split([q_width, kv_width, kv_width])
            return onequery.attend(q, k, v, rope, cache, layer, position, kv_len)
        q, k, v = onerow.heads(qkv, w, spec, rope)
        return onequery.attend(q, k, v, None, cache, layer, position, kv_len)

    def _predict(
        self, h: torch.Tensor, layer: int | None, live: torch.Tensor | None, at: str
    ) -> None:
        """Hand the prefetcher MoE layer `layer`'s router's choice on h (B, T, D), as that
        layer would make it with h as its MoE input. Reads h, changes nothing."""
        prefetcher = self.prefetcher
        if prefetcher is None or prefetcher.predict_from not in (at, "both") or layer is None:
            return
        c = self.config
        x = h.reshape(-1, c.hidden_size)  # (N, D)
        if live is not None:
            x = x[live]
        mlp = self.weights.layers[layer].mlp
        assert isinstance(mlp, MoEWeights)
        if x.shape[0] == 1 and self.spec.router.plain and mlp.correction is None:
            # one matrix-vector product and one sync; ranking E floats in Python beats topk
            # (measured 11 against 30-45 µs a guess, with fewer stalls on a loaded CPU)
            logits = torch.mv(self._guess_routers[layer], x[0])  # (E,)
            if mlp.router_bias is not None:  # the norm's 1/rms no longer leaves the order
                logits = logits * torch.rsqrt(x[0].float().pow(2).mean() + c.rms_norm_eps)
                logits = logits + mlp.router_bias
            scores = logits.tolist()
            order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
            ranked = order[: c.num_experts_per_tok]
        elif x.shape[0]:
            normed = rms_norm(x, self.weights.layers[layer].post_attn_norm, c.rms_norm_eps)
            ranked = predict_experts(
                normed, mlp.router, self.spec.router, mlp.router_bias, mlp.correction
            )
        else:
            return
        prefetcher.prefetch(layer, ranked, at)

    def _moe(
        self, x: torch.Tensor, mlp: MoEWeights, layer: int, live: torch.Tensor | None
    ) -> torch.Tensor:
        if live is None:
            return self._moe_rows(x, mlp, layer)
        out = torch.zeros_like(x)
        out[live] = self._moe_rows(x[live], mlp, layer)
        return out

    def _moe_rows(self, x: torch.Tensor, mlp: MoEWeights, layer: int) -> torch.Tensor:
        """Routed experts, then the shared expert added, as the references sum them."""
        out = moe_block(
            x, mlp.router, self.spec.router, layer, self.backend, mlp.router_bias, mlp.correction
        )
        shared = _shared_expert(x, mlp)
        return out if shared is None else out + shared

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, D) final-normed hidden -> (N, V) logits; one row by the C++ layers' row loops
        where the step takes them (`rowlayer.product`)."""
        if self._cpp.planned and hidden.shape[0] == 1:
            y = rowlayer.product(hidden, self.weights.lm_head)
            if y is not None:
                return y
        return linear(hidden, self.weights.lm_head)


def _shared_expert(x: torch.Tensor, mlp: MoEWeights) -> torch.Tensor | None:
    """The shared expert's output on x (N, D), times its sigmoid gate where it has one; None
    without a shared expert."""
    if mlp.shared is None:
        return None
    shared = mlp.shared(x)
    if mlp.shared_gate is not None:
        shared = torch.sigmoid(F.linear(x, mlp.shared_gate)) * shared
    return shared
