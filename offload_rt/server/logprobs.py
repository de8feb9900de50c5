"""Log-probabilities in OpenAI's two shapes.

Completions (the legacy form): parallel lists `tokens`, `token_logprobs`, `top_logprobs`
(one {token: logprob} per position, the top N plus the token itself, so up to N + 1, as
OpenAI documents) and `text_offset` (where each token's text starts in the choice's text).
A prompt's first token, echoed, has null for its log-probability and its top.
Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
A token that is part of a character shows as `bytes:\\xNN` (OpenAI's spelling); `bytes` has
its exact bytes either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from offload_rt.engine.logprobs import TokenLogprob
from offload_rt.engine.tokenizer import TextTokenizer


def completion_logprobs(
    tok: TextTokenizer, entries: Sequence[TokenLogprob], offsets: Sequence[int]
) -> dict[str, list[Any]]:
    return {
        "tokens": [tok.token_text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_map(tok, e) for e in entries],
        "text_offset": list(offsets),
    }


def merge_completion(first: dict[str, list[Any]], then: dict[str, list[Any]]) -> dict:
    """The logprobs of an echoed prompt followed by those of its new tokens."""
    return {k: first[k] + then[k] for k in first}


def _top_map(tok: TextTokenizer, e: TokenLogprob) -> dict[str, float] | None:
    if e.logprob is None:
        return None
    top = {tok.token_text(t): lp for t, lp in e.top}
    top.setdefault(tok.token_text(e.token), e.logprob)
    return top


def chat_logprobs(tok: TextTokenizer, entries: Sequence[TokenLogprob]) -> dict[str, list]:
    return {"content": [_chat_entry(tok, e) for e in entries]}


def _chat_entry(tok: TextTokenizer, e: TokenLogprob) -> dict[str, Any]:
    return {
        **_token(tok, e.token, e.logprob),
        "top_logprobs": [_token(tok, t, lp) for t, lp in e.top],
    }


def _token(tok: TextTokenizer, token: int, logprob: float | None) -> dict[str, Any]:
    return {
        "token": tok.token_text(token),
        "logprob": logprob,
        "bytes": list(tok.token_bytes(token)),
    }


def offsets(tok: TextTokenizer, tokens: list[int], start: int, first: int = 0) -> list[int]:
    """Where each token's text, from tokens[first] on, starts in a text whose first `start`
    characters come before these tokens' own."""
    return [start + n for n in tok.prefix_lengths(tokens, first)]
