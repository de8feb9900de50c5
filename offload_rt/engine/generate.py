"""Generation: a batched prefill of prompts of different lengths, then incremental decode.

Prompts are right-padded into one prefill; every row keeps its own positions in the shared KV
cache, so a row's tokens are those of its solo run. Padding and finished rows never reach an
expert.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from offload_rt.engine.grammar import Grammars
from offload_rt.engine.logprobs import TokenLogprob, prompt_logprobs
from offload_rt.engine.rows import (
    GenerationResult,
    SequenceState,
    check_finished,
    check_request,
    new_state,
    raw_greedy,
    sample_rows,
    to_result,
)
from offload_rt.engine.sampling import SamplingParams
from offload_rt.model import DecoderModel, KVCache


class BatchDecoder:
    """Holds the KV cache of B sequences; `prefill` once, then `step` per new token."""

    def __init__(self, model: DecoderModel, prompts: list[list[int]], max_len: int) -> None:
        self.model = model
        self.lengths = [len(p) for p in prompts]  # tokens in the cache per row, after prefill
        self.prompts = prompts
        self.cache = model.new_cache(len(prompts), max_len)
        self.device = model.device
        self._greedy: tuple[torch.Tensor, list[int]] | None = None  # `step`'s last, with its logits
        self._first: KVCache | None = None  # the cache of the first row alone, for `step_token`

    @classmethod
    def empty(cls, model: DecoderModel, rows: int, max_len: int) -> BatchDecoder:
        """`rows` free rows, each filled later by `prefill_rows` (continuous batching)."""
        return cls(model, [[] for _ in range(rows)], max_len)

    @torch.inference_mode()
    def prefill_rows(
        self, rows: list[int], prompts: list[list[int]], score: list[int | None] | None = None
    ) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """Prefill prompts together, as `prefill_scored` does a static batch, into the given
        free rows; returns their logits after each last prompt token (len(rows), V) and their
        prompt log-probabilities where `score` asks. A prompt given several times (n choices)
        is prefilled once and its keys and values copied to each of its rows."""
        score = score or [None] * len(prompts)
        unique: dict[tuple[int, ...], int] = {}
        source = [unique.setdefault(tuple(p), len(unique)) for p in prompts]  # its unique one
        asks: list[int | None] = [None] * len(unique)  # the most top-k any copy asks for
        for u, k in zip(source, score):
            if k is not None:
                asks[u] = max(k, asks[u] or 0)
        batch = BatchDecoder(self.model, [list(p) for p in unique], max(len(p) for p in prompts))
        logits, scored = batch.prefill_scored(asks)
        index = torch.tensor(rows, device=self.device)
        pick = torch.tensor(source, device=self.device)
        self.cache.copy_rows(index, batch.cache, pick)
        for row, p in zip(rows, prompts):
            self.lengths[row] = len(p)
        return logits[pick], [_cut(scored[u], k) for u, k in zip(source, score)]

    def prefill(self) -> torch.Tensor:
        """Returns each row's logits after its last prompt token: (B, V)."""
        return self.prefill_scored([None] * len(self.prompts))[0]

    @torch.inference_mode()
    def prefill_scored(
        self, score: list[int | None]
    ) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """Each row's logits after its last prompt token (B, V), and, for the rows where
        `score` gives a top-k, the log-probabilities of its prompt tokens: lm_head then runs
        on every position of those rows only."""
        hidden = self.prefill_hidden()
        lengths = torch.tensor(self.lengths, device=self.device)
        last = hidden[torch.arange(len(self.prompts)), lengths - 1]  # (B, D)
        scored = [
            None if k is None else prompt_logprobs(hidden[i, : len(p)], p, k, self.model.logits)
            for i, (p, k) in enumerate(zip(self.prompts, score))
        ]
        return self.model.logits(last), scored

    @torch.inference_mode()
    def prefill_hidden(self) -> torch.Tensor:
        """Put every row's prompt through the model into the cache; returns the final-normed
        hidden states (B, T, D) of every position (those past a row's length are padding), for
        callers that want more than the last position's logits (`engine/evaluate.py`)."""
        width = max(self.lengths)
        tokens = torch.zeros((len(self.prompts), width), dtype=torch.long)
        for i, p in enumerate(self.prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor(self.lengths)
        positions = torch.arange(width).expand(len(self.prompts), width)
        mask = positions < lengths[:, None]  # (B, T) False on padding
        return self.model.forward(
            tokens.to(self.device),
            positions.to(self.device),
            self.cache,
            kv_len=width,
            token_mask=None if bool(mask.all()) else mask.to(self.device),
            start=0,
        )

    def step(self, tokens: list[int], live: list[bool]) -> torch.Tensor:
        """Feed one token to each of the first len(tokens) rows (ignored where not live);
        returns their logits (len(tokens), V). Rows past them are left alone."""
        if len(tokens) == 1 and live[0]:  # one sequence (the first row): by its token id
            if self._first is None:  # a view of the first row, made once (writes go through)
                self._first = self.cache if len(self.lengths) == 1 else self.cache.rows(1)
            one = self.model.step_token(tokens[0], self.lengths[0], self._first)
            if one is not None:
                self.lengths[0] += 1
                self._greedy = (one[0], [one[1]])
                return one[0]
        return self._step(tokens, live)

    @torch.inference_mode()
    def _step(self, tokens: list[int], live: list[bool]) -> torch.Tensor:
        """`step` through the model's `step_logits`."""
        n = len(tokens)
        positions = [p if ok else 0 for p, ok in zip(self.lengths[:n], live)]
        kv_len = max(positions) + 1
        cache = self.cache if n == len(self.lengths) else self.cache.rows(n)
        logits, greedy = self.model.step_logits(
            torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device),
            torch.tensor([[p] for p in positions], dtype=torch.long, device=self.device),
            cache,
            kv_len=kv_len,
            token_mask=None if all(live) else torch.tensor(live, device=self.device)[:, None],
            start=positions[0] if len(set(positions)) == 1 else None,
        )
        self.lengths[:n] = [p + 1 if ok else p for p, ok in zip(self.lengths[:n], live)]
        self._greedy = None if greedy is None else (logits, greedy)
        return logits

    def greedy_steps(self, token: int, n: int, stops: torch.Tensor) -> list[int] | None:
        """Up to n greedy steps of a one-row decoder in one call of the model
        (`greedy_steps`): feeds `token`, then each step's highest-scoring token, ending after
        one of `stops`; returns those tokens, or None where the model does not serve it
        (nothing done)."""
        if len(self.lengths) != 1:
            return None
        found = self.model.greedy_steps(token, self.lengths[0], self.cache, n, stops)
        if found is not None:
            self.lengths[0] += len(found)
            self._greedy = None
        return found

    def greedy(self, logits: torch.Tensor) -> list[int] | None:
        """Each row's highest-scoring token of `logits` where they are the last `step`'s and
        the model found those tokens with them (`step_logits`), else None."""
        known = self._greedy
        return known[1] if known is not None and known[0] is logits else None


def generate(
    model: DecoderModel,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: tuple[int, ...],
    decode: Callable[[list[int]], str] | None,
    grammars: Grammars | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt together; each row stops on its own. grammars: for the
    rows whose params give a json_schema."""
    context = model.config.max_position_embeddings
    for i, (p, sp) in enumerate(zip(prompts, params)):
        check_request(p, sp, context, model.config.vocab_size, f"prompt {i}")
    rows = [new_state(p, sp, eos_ids, grammars) for p, sp in zip(prompts, params)]
    budget = [min(sp.max_new_tokens, context - len(p)) for p, sp in zip(prompts, params)]
    score = [sp.prompt_logprobs for sp in params]
    if max(budget) == 0 and all(k is None for k in score):
        return [to_result(r, decode) for r in rows]
    decoder = BatchDecoder(model, prompts, max(len(p) + b for p, b in zip(prompts, budget)))
    logits, scored = decoder.prefill_scored(score)
    for r, b, s in zip(rows, budget, scored):
        r.prompt_logprobs = s
        if b == 0:  # scored only: nothing to generate
            r.finish_reason = "length"
    runs = _run_stops(rows)
    while True:
        live = [r.finish_reason is None for r in rows]
        if not any(live):
            return [to_result(r, decode) for r in rows]
        sample_rows(rows, logits, live, decoder.greedy(logits))
        for r, b in zip(rows, budget):
            if r.finish_reason is None:
                check_finished(r, b, decode)
        live = [r.finish_reason is None for r in rows]
        if any(live) and runs is not None:
            _greedy_runs(decoder, rows[0], budget[0], runs)
            live = [rows[0].finish_reason is None]
        if any(live):
            logits = decoder.step([r.tokens[-1] if r.tokens else 0 for r in rows], live)


# a greedy run's calls: each takes about this long at most (the steps of a call hold the
# interpreter), the first runs RUN_FIRST steps, then each as many as fit, up to RUN_MOST
RUN_SECONDS, RUN_FIRST, RUN_MOST = 0.1, 2, 64


def _run_stops(rows: list[SequenceState]) -> torch.Tensor | None:
    """The stop ids of a lone row whose tokens are each the raw logits' highest-scoring one and
    whose end only a stop id or the budget decides (no stop strings, grammar, penalties or
    log-probabilities): the row greedy runs serve; else None."""
    if len(rows) != 1:
        return None
    r = rows[0]
    if not raw_greedy(r) or r.logprobs is not None or r.params.stop_strings:
        return None
    return torch.tensor(sorted(r.stop_ids), dtype=torch.long)


def _greedy_runs(decoder: BatchDecoder, r: SequenceState, budget: int, stops: torch.Tensor) -> None:
    """r's next tokens by greedy runs of steps (`BatchDecoder.greedy_steps`), each token checked
    as `generate`'s loop checks it, until r finishes or the model does not serve a run."""
    n = RUN_FIRST
    while r.finish_reason is None:
        start = time.perf_counter()
        found = decoder.greedy_steps(r.tokens[-1], min(n, budget - len(r.tokens)), stops)
        if found is None:
            return
        for token in found:  # the run ends after a stop id, within the budget
            r.tokens.append(token)
            check_finished(r, budget, None)  # no stop strings to decode
        took = (time.perf_counter() - start) / len(found)
        n = max(1, min(RUN_MOST, int(RUN_SECONDS / max(took, 1e-6))))


def _cut(scored: list[TokenLogprob] | None, k: int | None) -> list[TokenLogprob] | None:
    """A copy's prompt log-probabilities with its own top-k (the unique prompt's may be more)."""
    if k is None or scored is None:
        return None
    return [TokenLogprob(t.token, t.logprob, t.top[:k]) for t in scored]
