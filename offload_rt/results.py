"""What a generation gives back, and the error a bad request raises: plain dataclasses with no
torch, shared by the engine, the server and the Python client (which must import without
torch or Ray)."""

from __future__ import annotations

from dataclasses import dataclass


class RequestError(ValueError):
    """A generation request that cannot be served as asked; the message names the field."""


@dataclass(frozen=True)
class TokenLogprob:
    token: int  # the token at this position (sampled, or the prompt's)
    logprob: float | None  # its log-probability; None for a prompt's first token (no context)
    top: tuple[tuple[int, float], ...] = ()  # the k likeliest tokens here, best first


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only (a closing EOS or stop token included)
    text: str | None  # the new tokens decoded, cut before a stop string; None without tokenizer
    finish_reason: str  # "stop" (EOS, stop token, stop string, grammar complete) or "length"
    prompt_tokens: int  # tokens in the prompt
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked (`logprobs`)
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked
