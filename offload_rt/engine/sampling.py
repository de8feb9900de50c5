"""Sampling parameters and the per-sequence sampler.

Each sequence samples with its own generator, on the CPU, so a seeded request gives the same
tokens alone or in a batch, on any device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from offload_rt.engine.grammar import schema_text
from offload_rt.engine.logprobs import MAX_TOP_LOGPROBS
from offload_rt.results import RequestError

MAX_LOGIT_BIAS = 1024  # entries of logit_bias: more is a request to refuse, not to serve


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16  # most tokens to generate
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0: all
    seed: int | None = None  # for reproducible sampling; None: fresh randomness
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS
    stop_strings: tuple[str, ...] = ()  # generation ends once the text contains one
    # log-probabilities (float32, of the raw logits): None: none; k: each new token's and the
    # k likeliest tokens' at its position (0 to 20)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    # OpenAI's: logit -= count * frequency_penalty + (count > 0) * presence_penalty, with
    # count a token's occurrences among the generated tokens; each in [-2, 2]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' and vLLM's: a logit of a token of the prompt or the generated tokens is
    # divided by it when positive, multiplied when negative; 1: off; in (0, 2]
    repetition_penalty: float = 1.0
    # (token id, bias) added to the logits, OpenAI's range [-100, 100]; a mapping is taken too
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS and stop tokens are masked, stop strings unchecked, until then
    ignore_eos: bool = False  # the model's EOS does not end generation (stop tokens still do)
    # the output follows this JSON schema (its JSON text; a mapping is taken too) through
    # constrained decoding, and ends when the schema's value is complete; None: free text
    json_schema: str | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=0)
        self._check_extensions()
        _check_int("top_k", self.top_k, minimum=0)
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise RequestError(
                f"temperature must be a number in [0, 100], got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**63:  # what a torch generator takes
                raise RequestError(f"seed must be below 2**63, got {self.seed}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise RequestError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")

    def _check_extensions(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v, minimum=0)
                if v > MAX_TOP_LOGPROBS:
                    raise RequestError(f"{name} must be at most {MAX_TOP_LOGPROBS}, got {v}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise RequestError(f"{name} must be a number in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0 < rp <= 2:
            raise RequestError(f"repetition_penalty must be a number in (0, 2], got {rp!r}")
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_new_tokens:
            raise RequestError(
                f"min_tokens ({self.min_tokens}) must be at most max_new_tokens "
                f"({self.max_new_tokens})"
            )
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        # frozen: the normalised forms are set once, here
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", schema_text(self.json_schema))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler sees other scores than the raw logits (penalties, bias...)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )

    @classmethod
    def with_stop(cls, stop: str | int | Sequence[str | int] | None, **kwargs) -> SamplingParams:
        """Split `stop` (strings and/or token ids) into its two kinds; the other fields by
        name (an unknown name is a RequestError, as any bad argument)."""
        named = {f.name for f in fields(cls)} - {"stop_token_ids", "stop_strings"}
        unknown = sorted(set(kwargs) - named)
        if unknown:
            raise RequestError(f"unknown sampling arguments: {', '.join(unknown)}")
        items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        ids = [s for s in items if isinstance(s, int) and not isinstance(s, bool)]
        strings = [s for s in items if isinstance(s, str)]
        if len(ids) + len(strings) != len(items):
            raise RequestError(f"stop must hold strings or token ids, got {stop!r}")
        return cls(stop_token_ids=tuple(ids), stop_strings=tuple(strings), **kwargs)


def _bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs; ids are checked against the vocabulary
    when the request meets a model."""
    if isinstance(bias, Mapping):
        bias = tuple(bias.items())
    if not isinstance(bias, (tuple, list)):
        raise RequestError(f"logit_bias must map token ids to numbers, got {bias!r}"[:200])
    if len(bias) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias has {len(bias)} entries; the most is {MAX_LOGIT_BIAS}")
    pairs = []
    for item in bias:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise RequestError(f"logit_bias entries are (token id, bias) pairs, got {item!r}"[:200])
        token, value = item
        _check_int("a logit_bias token id", token, minimum=0)
        if not _is_number(value) or not -100 <= value <= 100:
            raise RequestError(
                f"logit_bias of token {token} must be a number in [-100, 100], got {value!r}"[:200]
            )
        pairs.append((token, float(value)))
    if len({t for t, _ in pairs}) != len(pairs):
        raise RequestError("logit_bias names a token id twice")
    return tuple(sorted(pairs))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _check_int(name: str, v: object, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RequestError(f"{name} must be an integer >= {minimum}, got {v!r}")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: (V,) on the CPU, float32."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        scores = logits / p.temperature
        if p.top_k:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            scores = _top_p_filter(scores, p.top_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
    # drop a token when the tokens before it already reach top_p; the first always stays
    drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
