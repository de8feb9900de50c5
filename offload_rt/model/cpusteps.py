"""A decoder's one-row CPU steps through the C++ layers: each layer as two calls
(`model/rowlayer.py`) with the backend's lookups between them, or, once every expert's weights
stay put for good, the whole step as one call (`model/rowstep.py`), with the model's head where
the caller asks for the step's logits.

What the calls read is made once and kept here: the layers' plans (for the first step's dtype,
the model's), the whole-step table and the head; a KV cache's checks and pointers are looked at
once a cache object (a cache's tensors stay put).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from offload_rt.grid import ExpertKey
from offload_rt.model import onequery, onerow, rowlayer, rowstep
from offload_rt.model.kvcache import KVCache
from offload_rt.model.layers import AttentionSpec, RopeTables
from offload_rt.model.moe import ExpertBackend, RouterSpec


class CppSteps:
    """The C++ steps of one decoder. plan_layers: each layer's plan for a dtype
    (`rowlayer.plan`, None for a layer it does not serve); head: the final norm's weight and
    lm_head. Both are asked at the first step (the loader may replace the decoder's weights
    after building it: quantized, moved to huge pages)."""

    def __init__(
        self,
        attention: object,
        router: RouterSpec,
        experts: int,
        eps: float,
        rope: RopeTables,
        head: Callable[[], tuple[torch.Tensor, object]],
        backend: ExpertBackend,
        plan_layers: Callable[[torch.dtype], list[rowlayer.LayerPlan | None]],
    ) -> None:
        self.attention, self.router, self.experts = attention, router, experts  # a layer's
        self.eps, self.rope = eps, rope
        self.backend, self.plan_layers, self.head = backend, plan_layers, head
        self._plans: list[rowlayer.LayerPlan] | None | bool = False  # False: not yet asked
        self._tokens: rowstep.TokenTable | None | bool = None  # False: not possible
        self._head: rowstep.Head | None | bool = None  # False: the loops do not take lm_head
        self._cache: tuple[weakref.ref, torch.dtype] | None = None  # `takes`' last cache
        self._rows: tuple[weakref.ref, bool] | None = None  # `_ready`'s last cache, its checks
        # the one-call steps reuse one set of buffers (`TokenTable.begin`): one step at a time
        self._lock = threading.Lock()

    @property
    def planned(self) -> bool:
        """Whether the layers' plans are made (a step has taken the C++ layers)."""
        return bool(self._plans)

    def takes(self, cache: KVCache, dtype: torch.dtype) -> bool:
        """Whether a one-row step of this dtype with this cache takes the C++ layers: every
        layer planned (a plain MoE one, its weights in the activations' dtype, int8, or int4
        with bfloat16 ones) and every layer's attention taking `onequery`."""
        plans = self._layer_plans(dtype)
        if plans is None:
            return False
        known = self._cache
        if known is not None and known[0]() is cache and known[1] == dtype:
            return True
        if not all(onequery.applies(cache, i, dtype, None, None) for i in range(len(plans))):
            return False
        self._cache = (weakref.ref(cache), dtype)
        return True

    def run(
        self, h: torch.Tensor, cache: KVCache, position: int, head: bool
    ) -> tuple[torch.Tensor | None, rowstep.Logits | None]:
        """A step (`takes` said yes): the final-normed hidden state (1, 1, D), or, where `head`
        asks and the head's loops take lm_head, None and the step's logits. Experts the C++
        loops do not serve are computed by the backend."""
        spec = self.attention
        assert isinstance(spec, AttentionSpec)
        plans = self._plans
        assert isinstance(plans, list)
        resident = getattr(self.backend, "resident", None)  # a local backend's
        tokens = self._token_table(plans, h.dtype) if resident is not None else None
        max_len = tokens.point_at(cache) if tokens is not None else None
        if tokens is not None and max_len is not None:
            ends = self._the_head(h.dtype) if head else None
            with self._lock:
                step = tokens.begin(h, self.router.top_k)
                logits = self._whole(step, tokens, max_len, position, ends)
                return (None, logits) if logits is not None else (self._normed(step), None)
        step = rowlayer.Step(h, self.router.top_k)
        rope = self.rope.row(position, h.dtype)
        for i, plan in enumerate(plans):
            chosen_here = rowlayer.attend(
                step, plan, spec, rope, cache.keys[i], cache.values[i], position, self.router,
                self.experts, self.eps,
            )  # fmt: skip
            keys = [ExpertKey(i, e) for e in chosen_here]
            ffns = None if resident is None else resident(keys)
            if ffns is not None and rowlayer.experts(step, ffns):
                continue
            m = step.m
            if ffns is not None:  # looked up, not of the C++ loops' kind
                step.set_outputs([ffn(m) for ffn in ffns])
                continue
            outputs = self.backend.run({key: m for key in keys})
            step.set_outputs([outputs[key] for key in keys])
        ends = self._the_head(h.dtype) if head else None
        if ends is not None:
            return None, rowstep.finish(step, ends, self.eps)
        return self._normed(step), None

    def token_logits(
        self, embed: torch.Tensor, token: int, cache: KVCache, position: int
    ) -> rowstep.Logits | None:
        """A step of one token id (a row of `embed`) as one call with the head, where `takes`
        said yes for this cache and every expert's weights stay put: the step's logits; else
        None, and nothing done (`run` then serves the step)."""
        ready = self._ready(embed, cache)
        if ready is None:
            return None
        tokens, max_len, head = ready
        with self._lock:
            step = tokens.begin_row(embed, token, self.router.top_k)
            return self._whole(step, tokens, max_len, position, head)

    def greedy(
        self,
        embed: torch.Tensor,
        token: int,
        cache: KVCache,
        position: int,
        n: int,
        stops: torch.Tensor,
    ) -> list[int] | None:
        """Up to n greedy steps in one call (`rowstep.greedy`) where `token_logits` would take
        the first: the tokens found, the backend's uses counted step by step; else None, and
        nothing done."""
        ready = self._ready(embed, cache)
        if ready is None:
            return None
        tokens, max_len, head = ready
        spec = self.attention
        assert isinstance(spec, AttentionSpec)
        with self._lock:
            step = tokens.begin_row(embed, token, self.router.top_k)
            found, chosen = rowstep.greedy(
                step, tokens, spec, (self.rope.cos, self.rope.sin), max_len, position,
                self.router, self.eps, head, embed, token, n, stops,
            )  # fmt: skip
            for uses in chosen.tolist():
                self.backend.count_uses(uses)  # type: ignore[attr-defined]
        return found

    def _ready(
        self, embed: torch.Tensor, cache: KVCache
    ) -> tuple[rowstep.TokenTable, int, rowstep.Head] | None:
        """The whole-step table pointed at `cache`, its length and the head, for steps from a
        token id of the embedding table `embed` (V, D): where the cache is of one row and no
        ring layers, the one-row path serves the model, `takes` says yes and every expert's
        weights stay put (the checks `MoEDecoder._forward` makes, a cache's looked at once);
        else None."""
        known = self._rows
        if known is None or known[0]() is not cache:
            serves = (
                cache.keys[0].shape[0] == 1
                and cache.ring_pos is None
                and isinstance(self.attention, AttentionSpec)
                and onerow.serves(embed.device, embed.dtype, embed.shape[1])
                and self.takes(cache, embed.dtype)
            )
            known = self._rows = (weakref.ref(cache), serves)
        plans = self._plans
        if not known[1] or not plans or getattr(self.backend, "resident", None) is None:
            return None
        tokens = self._token_table(plans, embed.dtype)  # type: ignore[arg-type]
        max_len = tokens.point_at(cache) if tokens is not None else None
        head = self._the_head(embed.dtype)
        if tokens is None or max_len is None or head is None:
            return None
        return tokens, max_len, head

    def _whole(
        self,
        step: rowlayer.Step,
        tokens: rowstep.TokenTable,
        max_len: int,
        position: int,
        head: rowstep.Head | None,
    ) -> rowstep.Logits | None:
        """The whole step in one call (`rowstep.token`), the backend's uses counted."""
        spec = self.attention
        assert isinstance(spec, AttentionSpec)
        chosen, logits = rowstep.token(
            step, tokens, spec, (self.rope.cos, self.rope.sin), max_len, position, self.router,
            self.eps, head,
        )  # fmt: skip
        self.backend.count_uses(chosen)  # type: ignore[attr-defined]
        return logits

    def _normed(self, step: rowlayer.Step) -> torch.Tensor:
        """The pending experts summed into h, through the final norm (the compiled glue)."""
        norm = self.head()[0]
        return onerow.enter(step.h.view(1, 1, -1), norm, self.eps, step.moe())[1]

    def _layer_plans(self, dtype: torch.dtype) -> list[rowlayer.LayerPlan] | None:
        """Every layer's plan where all of them have one, else None; made once (for the first
        step's dtype: the model's)."""
        if self._plans is False:
            self._plans = None
            if rowlayer.available():
                plans = self.plan_layers(dtype)
                if all(p is not None for p in plans):
                    self._plans = plans  # type: ignore[assignment]
        return self._plans  # type: ignore[return-value]

    def _token_table(
        self, plans: list[rowlayer.LayerPlan], dtype: torch.dtype
    ) -> rowstep.TokenTable | None:
        """The table of `rowstep.token` once every expert's weights stay put for good
        (`LocalExpertBackend.fixed_weights`); None before (asked again at the next step) or
        where the experts are not of one form (not asked again)."""
        if self._tokens is None:
            fixed = getattr(self.backend, "fixed_weights", None)
            ffns = fixed() if fixed is not None else None
            if ffns is None:
                return None
            built = (
                rowstep.TokenTable.build(plans, ffns, dtype) if len(ffns) == len(plans) else None
            )
            self._tokens = built if built is not None else False
        return self._tokens or None

    def _the_head(self, dtype: torch.dtype) -> rowstep.Head | None:
        """The head for the C++ calls, made once, where the row loops take lm_head."""
        if self._head is None:
            built = rowstep.Head.build(*self.head(), dtype)
            self._head = built if built is not None else False
        return self._head or None
