"""Generation: a batched prefill of prompts of different lengths, then incremental decode.

Prompts are right-padded into one prefill; every row keeps its own positions in the shared KV
cache, so a row's tokens are those of its solo run. Padding and finished rows never reach an
expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offload_rt.engine.sampling import RequestError, Sampler, SamplingParams
from offload_rt.model import DecoderModel


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only (a closing EOS or stop token included)
    text: str | None  # the new tokens decoded, cut before a stop string; None without tokenizer
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int  # tokens in the prompt


class BatchDecoder:
    """Holds the KV cache of B sequences; `prefill` once, then `step` per new token."""

    def __init__(self, model: DecoderModel, prompts: list[list[int]], max_len: int) -> None:
        self.model = model
        self.lengths = [len(p) for p in prompts]  # tokens in the cache per row, after prefill
        self.prompts = prompts
        self.cache = model.new_cache(len(prompts), max_len)
        self.device = model.device

    @classmethod
    def empty(cls, model: DecoderModel, rows: int, max_len: int) -> BatchDecoder:
        """`rows` free rows, each filled later by `prefill_rows` (continuous batching)."""
        return cls(model, [[] for _ in range(rows)], max_len)

    @torch.inference_mode()
    def prefill_rows(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Prefill prompts together, as `prefill` does a static batch, into the given free
        rows; returns their logits after each last prompt token (len(rows), V)."""
        batch = BatchDecoder(self.model, prompts, max(len(p) for p in prompts))
        logits = batch.prefill()
        self.cache.copy_rows(torch.tensor(rows, device=self.device), batch.cache)
        for row, p in zip(rows, prompts):
            self.lengths[row] = len(p)
        return logits

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Returns each row's logits after its last prompt token: (B, V)."""
        width = max(self.lengths)
        tokens = torch.zeros((len(self.prompts), width), dtype=torch.long)
        for i, p in enumerate(self.prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lengths = torch.tensor(self.lengths)
        positions = torch.arange(width).expand(len(self.prompts), width)
        mask = positions < lengths[:, None]  # (B, T) False on padding
        hidden = self.model.forward(
            tokens.to(self.device),
            positions.to(self.device),
            self.cache,
            kv_len=width,
            token_mask=None if bool(mask.all()) else mask.to(self.device),
            start=0,
        )
        last = hidden[torch.arange(len(self.prompts)), lengths.to(self.device) - 1]  # (B, D)
        return self.model.logits(last)

    @torch.inference_mode()
    def step(self, tokens: list[int], live: list[bool]) -> torch.Tensor:
        """Feed one token to each of the first len(tokens) rows (ignored where not live);
        returns their logits (len(tokens), V). Rows past them are left alone."""
        n = len(tokens)
        positions = [p if ok else 0 for p, ok in zip(self.lengths[:n], live)]
        kv_len = max(positions) + 1
        cache = self.cache if n == len(self.lengths) else self.cache.rows(n)
        hidden = self.model.forward(
            torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None],
            torch.tensor(positions, dtype=torch.long, device=self.device)[:, None],
            cache,
            kv_len=kv_len,
            token_mask=None if all(live) else torch.tensor(live, device=self.device)[:, None],
            start=positions[0] if len(set(positions)) == 1 else None,
        )
        self.lengths[:n] = [p + 1 if ok else p for p, ok in zip(self.lengths[:n], live)]
        return self.model.logits(hidden[:, 0])


@dataclass
class SequenceState:
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None


def generate(
    model: DecoderModel,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos_ids: tuple[int, ...],
    decode: Callable[[list[int]], str] | None,
) -> list[GenerationResult]:
    """Generate for every prompt together; each row stops on its own."""
    context = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        check_prompt(p, context, model.config.vocab_size, f"prompt {i}")
    rows = [
        SequenceState(sp, Sampler(sp), frozenset(eos_ids) | frozenset(sp.stop_token_ids), len(p))
        for p, sp in zip(prompts, params)
    ]
    budget = [min(sp.max_new_tokens, context - len(p)) for p, sp in zip(prompts, params)]
    if max(budget) == 0:
        return [to_result(r, decode) for r in rows]
    decoder = BatchDecoder(model, prompts, max(len(p) + b for p, b in zip(prompts, budget)))
    logits = decoder.prefill()
    while True:
        live = [r.finish_reason is None for r in rows]
        sample_rows(rows, logits, live)
        for r, b in zip(rows, budget):
            if r.finish_reason is None:
                check_finished(r, b, decode)
        live = [r.finish_reason is None for r in rows]
        if not any(live):
            return [to_result(r, decode) for r in rows]
        logits = decoder.step([r.tokens[-1] if r.tokens else 0 for r in rows], live)


def check_prompt(prompt: list[int], context: int, vocab: int, what: str = "the prompt") -> None:
    """A prompt must leave room for one new token and hold only ids of the vocabulary."""
    if not prompt:
        raise RequestError(f"{what} is empty: give at least one token")
    if len(prompt) >= context:
        raise RequestError(
            f"{what} has {len(prompt)} tokens; the context length is {context}, "
            "which leaves no room for a new token"
        )
    bad = [t for t in prompt if t < 0 or t >= vocab]
    if bad:
        raise RequestError(f"{what}: token ids must lie in [0, {vocab}), got {bad[0]}")


def sample_rows(rows: list[SequenceState], logits: torch.Tensor, live: list[bool]) -> None:
    greedy = torch.argmax(logits, dim=-1).tolist()
    sampled = [i for i, r in enumerate(rows) if live[i] and not r.params.greedy]
    cpu = logits[sampled].float().cpu() if sampled else None
    for i, r in enumerate(rows):
        if not live[i]:
            continue
        if r.params.greedy:
            r.tokens.append(greedy[i])
        else:
            r.tokens.append(r.sampler.sample(cpu[sampled.index(i)]))


def check_finished(
    r: SequenceState, budget: int, decode: Callable[[list[int]], str] | None
) -> None:
    if r.tokens[-1] in r.stop_ids:
        r.finish_reason = "stop"
        return
    if r.params.stop_strings and decode is not None:
        text = decode(r.tokens)
        cut = min((text.find(s) for s in r.params.stop_strings if s in text), default=-1)
        if cut >= 0:
            r.text, r.finish_reason = text[:cut], "stop"
            return
    if len(r.tokens) >= budget:
        r.finish_reason = "length"


def to_result(r: SequenceState, decode: Callable[[list[int]], str] | None) -> GenerationResult:
    text = r.text
    if text is None and decode is not None:
        text = decode(r.tokens)
    return GenerationResult(r.tokens, text, r.finish_reason or "length", r.prompt_len)
