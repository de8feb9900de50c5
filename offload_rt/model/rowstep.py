"""A whole one-row CPU decode step in one C++ call: every layer's two calls of
`model/rowlayer.py` in one (its mode 3), once every expert's weights stay put for good.

The decoder's `CppSteps` builds a `TokenTable` once (each layer's plan, its KV cache's two
pointers, rewritten for each new cache object, and every expert's six pointers); `token` then
runs, for each layer, call 1's loops, picks the chosen experts' pointers from the table and
runs call 2's. The same loops in the same order as the two calls, so the same logits bit for
bit; the backend's counts are kept by its `count_uses` after the step. Where the decoder asks
for a step's logits (`MoEDecoder.step_logits`), the call ends with the model's head (`Head`:
the last layer's experts summed, the final RMSNorm, lm_head by the same row loops, the logits'
argmax), and the two-call path ends with the same loops (`finish`): no Python between the last
layer and the logits (a float16 step 2.1%, an int4 one 2.7% faster, in-process A/B).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from offload_rt.model import native, rowlayer, rows
from offload_rt.model.kvcache import KVCache
from offload_rt.model.layers import AttentionSpec
from offload_rt.model.moe import RouterSpec
from offload_rt.model.rows import Form


class TokenTable:
    """What `token` reads for a whole step: per layer, its plan's 13 values, its cache's keys
    and values, and the pointers of each of its experts (every expert of the model, resident
    for good: their weights never move); the tensors behind them are held here."""

    def __init__(
        self,
        plans: Sequence[rowlayer.LayerPlan],
        ffns: Sequence[Sequence[object]],
        kinds: Sequence[Sequence[tuple[list[int], Form, int]]],
    ) -> None:
        rows = [
            [*plan.table.tolist(), 0, 0, *(p for kind in layer for p in kind[0])]
            for plan, layer in zip(plans, kinds)
        ]
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.plans, self.ffns = list(plans), [list(f) for f in ffns]  # held
        self.form, self.width = kinds[0][0][1], kinds[0][0][2]
        self.layers, self.experts = len(rows), len(kinds[0])
        self._cache: tuple[weakref.ref, int] | None = None  # `point_at`'s cache, its length
        self._step: rowlayer.Step | None = None  # `begin`'s, reused step after step
        self._call: _Call | None = None  # `token`'s arguments, for its last step and settings
        self._row: tuple[torch.Tensor, int, int, int] | None = None  # `begin_row`'s copy

    @classmethod
    def build(
        cls,
        plans: Sequence[rowlayer.LayerPlan],
        ffns: Sequence[Sequence[object]],
        dtype: torch.dtype,
    ) -> TokenTable | None:
        """The table for these plans and every layer's experts (in expert order), or None where
        the plans' form differs between layers or an expert is not of one form and width."""
        kinds = [[rows.expert_kind(f, dtype) for f in layer] for layer in ffns]
        first = kinds[0][0] if kinds and kinds[0] else None
        if first is None or any(p.form != plans[0].form for p in plans):
            return None
        if any(k is None or k[1:] != first[1:] for layer in kinds for k in layer):
            return None
        return cls(plans, ffns, kinds)  # type: ignore[arg-type]

    def begin(self, h: torch.Tensor, k: int) -> rowlayer.Step:
        """A step's state for `token` from the embedded token h (its buffers made once, at the
        first step, and reused: a step's state does not outlive it)."""
        step = self._step
        if step is None or step.h.dtype != h.dtype or step.w.shape[0] != k:
            step = self._step = rowlayer.Step(h, k)
        else:
            step.h.copy_(h.view(-1))
            step.pending = 0
        return step

    def begin_row(self, embed: torch.Tensor, token: int, k: int) -> rowlayer.Step:
        """`begin` from row `token` of the embedding table (V, D): one copy of the row's bytes
        into the reused step, no torch op (after the first step)."""
        if not 0 <= token < embed.shape[0]:
            raise IndexError(f"token {token} is not in the vocabulary [0, {embed.shape[0]})")
        step, row = self._step, self._row
        if step is None or step.h.dtype != embed.dtype or step.w.shape[0] != k:
            self._row = None  # a new step: its buffers elsewhere
            return self.begin(embed[token], k)
        step.pending = 0
        if row is not None and row[0] is embed:
            ctypes.memmove(row[2], row[1] + token * row[3], row[3])
            return step
        step.h.copy_(embed[token])
        if embed.is_contiguous():  # the pointers for the next steps
            self._row = (embed, embed.data_ptr(), step.h.data_ptr(), step.h.nbytes)
        return step

    def point_at(self, cache: KVCache) -> int | None:
        """Point the layers at `cache` (its tensors looked at once a cache object: a cache's
        tensors stay put): its positions, or None where its layers' lengths differ (ring
        layers), and then nothing pointed."""
        known = self._cache
        if known is not None and known[0]() is cache:
            return known[1]
        lengths = {keys.shape[2] for keys in cache.keys}
        if len(lengths) != 1:
            return None
        caches = [t.data_ptr() for pair in zip(cache.keys, cache.values) for t in pair]
        self.table[:, 13:15] = torch.tensor(caches, dtype=torch.int64).view(-1, 2)
        self._cache = (weakref.ref(cache), lengths.pop())
        return self._cache[1]


class Logits(NamedTuple):
    """A step's logits (1, V) and their argmax (the first of equals, a NaN above all)."""

    logits: torch.Tensor
    best: int


class Head:
    """The model's head as the C++ reads it (mode 5 of `model/rowlayer.py`): the final RMSNorm's
    weight, lm_head's pointers (as `Rows`), its rows, group and format; the tensors held. The
    call writes the logits' argmax too (the first of equals, a NaN above all, as torch.argmax):
    a greedy step's token without another pass over them in Python."""

    def __init__(self, norm: torch.Tensor, held: tuple, vocab: int, form: Form) -> None:
        self.table = torch.tensor(  # and a last value the call writes: the logits' argmax
            [norm.data_ptr(), *rows.pointers(held), vocab, form[1], form[0], 0], dtype=torch.int64
        )
        self.held, self.vocab = (norm, *held), vocab
        self._read = self.table.numpy()  # the written argmax, read without a torch op

    def best(self) -> int:
        """The argmax the last call wrote."""
        return self._read.item(7)

    @classmethod
    def build(cls, norm: torch.Tensor, lm_head: object, dtype: torch.dtype) -> Head | None:
        """The head for activations of `dtype`, or None where the row loops do not take lm_head
        (`rows.matrix`) or the norm is not of that dtype."""
        part = rows.matrix(lm_head, dtype)
        if part is None or norm.dtype != dtype or not norm.is_contiguous():
            return None
        return cls(norm, part[0], lm_head.shape[0], part[1])  # type: ignore[attr-defined]


def token(
    step: rowlayer.Step,
    tt: TokenTable,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    max_len: int,
    position: int,
    router: RouterSpec,
    eps: float,
    head: Head | None = None,
) -> tuple[list[list[int]], Logits | None]:
    """Every layer of a step in one call (`attend` then `experts` each, the same loops), the
    cache `tt.point_at` points at holding `max_len` positions; rope: the float32 cos and sin
    tables (positions, Hd) (`RopeTables`), read at the position and rounded to the dtype
    there. Returns the chosen experts by layer, each layer's in ascending order, with the last
    layer's outputs pending in step; or, where `head` is given, summed into step.h and through
    the head (`finish`): the chosen experts and the logits."""
    kernel = rowlayer.cpp()
    assert kernel is not None
    if not 0 <= position < max_len:  # the C++ would write past the cache
        raise IndexError(f"position {position} does not fit a cache of {max_len} positions")
    call = _call(step, tt, spec, rope, max_len, router, eps, head)
    if position >= call.positions:
        raise ValueError(f"rope: tables holding position {position}")
    args = call.args
    logits = None if head is None else torch.empty((1, head.vocab), dtype=step.h.dtype)
    if logits is not None:
        args[10] = logits
    args[4], args[12], args[29] = step.pending, position, torch.get_num_threads()
    kernel(*args)
    step.pending = router.top_k if head is None else 0
    ends = None if head is None else Logits(logits, head.best())  # type: ignore[arg-type]
    return call.chosen.tolist(), ends


def greedy(
    step: rowlayer.Step,
    tt: TokenTable,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    max_len: int,
    position: int,
    router: RouterSpec,
    eps: float,
    head: Head,
    embed: torch.Tensor,
    first: int,
    n: int,
    stops: torch.Tensor,
) -> tuple[list[int], torch.Tensor]:
    """Up to n greedy steps in one call, each `token`'s with the head: token `first` (a row of
    `embed`, (V, D)) at `position`, then each step's argmax at the next position, ending
    after a step whose argmax is one of `stops` (int64 ids). Returns those argmaxes and each
    step's chosen experts (steps, layers, k); step.h then holds the last step's hidden state
    (its experts summed in) and step.m its final-normed one."""
    kernel = rowlayer.cpp()
    assert kernel is not None
    if n < 1 or position < 0 or position + n > max_len:
        raise IndexError(f"{n} steps from position {position} do not fit a cache of {max_len}")
    if not 0 <= first < embed.shape[0]:
        raise IndexError(f"token {first} is not in the vocabulary [0, {embed.shape[0]})")
    if embed.dtype != step.h.dtype or embed.shape[1:] != step.h.shape or head.vocab > len(embed):
        raise ValueError("embed: the embedding table (V, D) of the step's dtype, V >= lm_head's")
    if not embed.is_contiguous() or stops.dtype != torch.int64 or not stops.is_contiguous():
        raise ValueError("embed and stops: contiguous, stops as int64 ids")
    call = _call(step, tt, spec, rope, max_len, router, eps, head)
    if position + n > call.positions:
        raise ValueError(f"rope: tables holding position {position + n - 1}")
    out = torch.empty(n, dtype=torch.int64)
    chosen = torch.empty((n, tt.layers, router.top_k), dtype=torch.int64)
    table = torch.tensor(
        [head.table.data_ptr(), embed.data_ptr(), n, stops.data_ptr(), stops.numel(),
         out.data_ptr(), first, 0],
        dtype=torch.int64,
    )  # fmt: skip
    args = list(call.args)
    args[0], args[9], args[10] = 6, table, torch.empty((1, head.vocab), dtype=step.h.dtype)
    args[12], args[28], args[29] = position, chosen, torch.get_num_threads()
    kernel(*args)
    step.pending = 0
    done = int(table[7])
    return out[:done].tolist(), chosen[:done]


def _call(
    step: rowlayer.Step,
    tt: TokenTable,
    spec: AttentionSpec,
    rope: tuple[torch.Tensor, torch.Tensor],
    max_len: int,
    router: RouterSpec,
    eps: float,
    head: Head | None,
) -> _Call:
    """The call's arguments for these, made once (`tt`'s, while they stay the same)."""
    cos, sin = rope
    call = tt._call
    if call is None or not call.made_for((step, cos, sin, spec, router, head), (max_len, eps)):
        call = tt._call = _Call(step, tt, spec, rope, max_len, router, eps, head)
    return call


class _Call:
    """`token`'s arguments of the C++ call for one step object, rope tables, cache length,
    layer settings and head (checked once, then only the position, the threads, the pending
    experts and the logits change)."""

    def __init__(
        self,
        step: rowlayer.Step,
        tt: TokenTable,
        spec: AttentionSpec,
        rope: tuple[torch.Tensor, torch.Tensor],
        max_len: int,
        router: RouterSpec,
        eps: float,
        head: Head | None,
    ) -> None:
        cos, sin = rope
        if cos.dtype != torch.float32 or cos.dim() != 2 or cos.shape != sin.shape:
            raise ValueError("rope: the float32 cos and sin tables (positions, Hd)")
        if not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("rope: contiguous tables")
        self.objects, self.values = (step, cos, sin, spec, router, head), (max_len, eps)
        self.positions = cos.shape[0]
        k = router.top_k
        self.chosen = torch.empty((tt.layers, k), dtype=torch.int64)
        (form, group), expert_form = tt.plans[0].form, tt.form
        self.args = [
            3 if head is None else 5, step.h, step.ys, step.w, 0, tt.table, cos, sin,
            cos.shape[1], step.m if head is None else head.table, step.m, max_len, 0,
            spec.heads, spec.kv_heads, spec.head_dim, step.h.numel(), tt.width, tt.experts, k,
            group, form, eps, spec.eps, spec.clip_qkv or 0.0, router.renormalize, router.scale,
            step.m, self.chosen, 0, native.DTYPE_CODES[step.h.dtype], tt.layers,
            expert_form[1], expert_form[0],
        ]  # fmt: skip

    def made_for(self, objects: tuple, values: tuple) -> bool:
        """Whether these are the arguments for these objects (step, tables, settings, head:
        the same ones) and values (cache length, epsilon: equal ones)."""
        return self.values == values and all(a is b for a, b in zip(self.objects, objects))


def finish(step: rowlayer.Step, head: Head, eps: float) -> Logits:
    """The pending experts' outputs summed into step.h, h through the final norm (into step.m)
    and lm_head: the logits, by the loops `token` ends with."""
    kernel = rowlayer.cpp()
    assert kernel is not None
    logits = torch.empty((1, head.vocab), dtype=step.h.dtype)
    d, unused = step.h.numel(), step.m
    kernel(
        5, step.h, step.ys, step.w, step.pending, head.table, unused, unused, 0, head.table,
        logits, 0, 0, 0, 0, 0, d, 0, 0, 0, 0, 0, eps, 0.0, 0.0, 0, 0.0, step.m, step.chosen,
        torch.get_num_threads(), native.DTYPE_CODES[step.h.dtype], 0, 0, 0,
    )  # fmt: skip
    step.pending = 0
    return Logits(logits, head.best())
