"""One sequence of a batch: its state, how its next token is chosen, when it stops.

Shared by the static batch of `generate` and the scheduler's continuous batch: a row behaves
the same in either, so its tokens are those of its solo run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy
import torch

from offload_rt.engine.grammar import Grammars, RowGrammar
from offload_rt.engine.logprobs import TokenLogprob, token_logprobs
from offload_rt.engine.penalties import adjust_scores
from offload_rt.engine.sampling import Sampler, SamplingParams
from offload_rt.results import GenerationResult, RequestError


@dataclass
class SequenceState:
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]  # tokens that end the sequence: EOS (unless ignored), stop tokens
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # grows with tokens when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] | None = None  # set by the prefill when asked
    grammar: RowGrammar | None = None  # what the next token may be (params.json_schema)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def new_state(
    prompt: list[int],
    params: SamplingParams,
    eos_ids: Iterable[int],
    grammars: Grammars | None = None,
) -> SequenceState:
    """grammars: the model's compiler of JSON schemas (None: a model without tokenizer.json,
    which cannot take params.json_schema)."""
    stops = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_ids)
    lps = [] if params.logprobs is not None else None
    grammar = None
    if params.json_schema is not None:
        if grammars is None:
            raise RequestError("json_schema needs the model's tokenizer.json, which it lacks")
        grammar = grammars.row(params.json_schema)
    return SequenceState(
        params, Sampler(params), stops, list(prompt), logprobs=lps, grammar=grammar
    )


def check_request(
    prompt: list[int],
    params: SamplingParams,
    context: int,
    vocab: int,
    what: str = "the prompt",
) -> None:
    """A prompt must hold only ids of the vocabulary and leave room for one new token (or
    fit the context, when it is only scored); logit_bias must name ids of the vocabulary."""
    if not prompt:
        raise RequestError(f"{what} is empty: give at least one token")
    room = 1 if params.max_new_tokens > 0 else 0
    if len(prompt) + room > context:
        raise RequestError(
            f"{what} has {len(prompt)} tokens; the context length is {context}, "
            "which leaves no room for a new token"
        )
    bad = [t for t in prompt if t < 0 or t >= vocab]
    if bad:
        raise RequestError(f"{what}: token ids must lie in [0, {vocab}), got {bad[0]}")
    bad = [t for t, _ in params.logit_bias if t >= vocab]
    if bad:
        raise RequestError(f"logit_bias: token ids must lie in [0, {vocab}), got {bad[0]}")


def sample_rows(
    rows: list[SequenceState | None],
    logits: torch.Tensor,
    live: list[bool],
    greedy: list[int] | None = None,
) -> None:
    """Append each live row's next token, chosen from its own scores (the raw logits (B, V),
    or a copy adjusted by its penalties and bias, then masked by its grammar); advance its
    grammar; record its log-probability under the raw logits where asked. greedy: each row's
    highest-scoring raw token where the model found it with the logits (`BatchDecoder.greedy`)."""
    plain = {i for i, r in enumerate(rows) if live[i] and r and raw_greedy(r)}
    if plain and greedy is None:
        greedy = greedy_tokens(logits)  # one op for those rows
    for i, r in enumerate(rows):
        if live[i] and r is not None:
            r.tokens.append(greedy[i] if i in plain else _next_token(r, logits[i]))
            if r.grammar is not None:
                r.grammar.advance(r.tokens[-1])
    _record_logprobs(rows, logits, live)


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's highest-scoring token (the first of equals, as torch.argmax) of logits (B, V).
    On the CPU through numpy, on one thread: torch's argmax over 32000 scores took 50 µs in
    float32 and 130 in bfloat16 inside a decode step (its threads wake for each call)."""
    if logits.device.type == "cpu":
        return numpy.argmax(logits.float().numpy(), axis=-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def float_copy(x: torch.Tensor) -> torch.Tensor:
    """x (V,) as a float32 copy; on the CPU through numpy, whose copy runs on one thread
    where torch's waits for its threads on a busy machine (see RowGrammar.mask)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.numpy().copy())
    return x.to(torch.float32, copy=True)


def raw_greedy(r: SequenceState) -> bool:
    """Whether each of the row's tokens is the raw logits' highest-scoring one."""
    return r.params.greedy and _raw(r)


def _raw(r: SequenceState) -> bool:
    """Whether the row samples from the raw logits."""
    return not r.params.adjusts_logits and r.grammar is None


def _next_token(r: SequenceState, logits: torch.Tensor) -> int:
    """One row's token from its raw logits (V,), which stay as they are (for logprobs)."""
    scores = logits
    if r.params.adjusts_logits:
        scores = adjust_scores(logits, r.params, r.prompt, r.tokens, r.stop_ids)  # a copy
    if r.grammar is not None:
        if scores is logits:
            scores = float_copy(logits)
        r.grammar.mask(scores, logits)
    if r.params.greedy:
        return int(torch.argmax(scores))
    return r.sampler.sample(scores.float().cpu())


def _record_logprobs(
    rows: list[SequenceState | None], logits: torch.Tensor, live: list[bool]
) -> None:
    asking = [i for i, r in enumerate(rows) if live[i] and r and r.logprobs is not None]
    if not asking:
        return
    k = max(rows[i].params.logprobs for i in asking)  # type: ignore[union-attr,type-var]
    tokens = torch.tensor([rows[i].tokens[-1] for i in asking])  # type: ignore[union-attr]
    for i, lp in zip(asking, token_logprobs(logits[asking], tokens, k)):
        r = rows[i]
        assert r is not None and r.logprobs is not None and r.params.logprobs is not None
        r.logprobs.append(TokenLogprob(lp.token, lp.logprob, lp.top[: r.params.logprobs]))


def check_finished(
    r: SequenceState, budget: int, decode: Callable[[list[int]], str] | None
) -> None:
    if r.grammar is not None and r.grammar.done:  # the schema's value is complete
        r.finish_reason = "stop"
        return
    if len(r.tokens) < r.params.min_tokens:  # stop tokens were masked; stop strings wait too
        if len(r.tokens) >= budget:
            r.finish_reason = "length"
        return
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
    return GenerationResult(
        r.tokens, text, r.finish_reason or "length", r.prompt_len, r.logprobs, r.prompt_logprobs
    )
