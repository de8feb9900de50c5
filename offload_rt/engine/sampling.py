"""Sampling parameters and the per-sequence sampler.

Each sequence samples with its own generator, on the CPU, so a seeded request gives the same
tokens alone or in a batch, on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class RequestError(ValueError):
    """A generation request that cannot be served as asked; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16  # most tokens to generate
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0: all
    seed: int | None = None  # for reproducible sampling; None: fresh randomness
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS
    stop_strings: tuple[str, ...] = ()  # generation ends once the text contains one

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=0)
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def with_stop(cls, stop: str | int | Sequence[str | int] | None, **kwargs) -> SamplingParams:
        """Split `stop` (strings and/or token ids) into its two kinds."""
        items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        ids = [s for s in items if isinstance(s, int) and not isinstance(s, bool)]
        strings = [s for s in items if isinstance(s, str)]
        if len(ids) + len(strings) != len(items):
            raise RequestError(f"stop must hold strings or token ids, got {stop!r}")
        return cls(stop_token_ids=tuple(ids), stop_strings=tuple(strings), **kwargs)


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
