"""Log-probabilities of tokens under the model's own distribution.

Always float32 log_softmax of the raw logits: before temperature, top-p, penalties or a
logit bias, so a score means the same whatever the request's sampling (as OpenAI's and vLLM's
`logprobs` do). Shape legend: N positions, V vocabulary, k top tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload_rt.results import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs / logprobs
CHUNK_POSITIONS = 512  # prompt positions put through lm_head at once: bounds (N, V) floats

__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "prompt_logprobs", "token_logprobs"]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits (N, V) in any dtype and tokens (N,): each token's log-probability and the k
    likeliest tokens' (k = 0: none), in float32."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = lp.gather(1, tokens.to(lp.device)[:, None])[:, 0].tolist()  # (N,)
    ids = tokens.tolist()
    if k == 0:
        return [TokenLogprob(t, c) for t, c in zip(ids, chosen)]
    top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)  # values, indices: (N, k)
    pairs = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return [TokenLogprob(t, c, p) for t, c, p in zip(ids, chosen, pairs)]


def prompt_logprobs(
    hidden: torch.Tensor, prompt: list[int], k: int, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> list[TokenLogprob]:
    """The log-probability of every prompt token given the ones before it; hidden (T, D) are
    the prompt's final-normed hidden states. lm_head runs on at most CHUNK_POSITIONS positions
    at once, so a long prompt never holds (T, V) logits."""
    out = [TokenLogprob(prompt[0], None)]  # the first token has nothing to be predicted from
    targets = torch.tensor(prompt[1:], dtype=torch.long)
    for start in range(0, len(prompt) - 1, CHUNK_POSITIONS):
        end = min(start + CHUNK_POSITIONS, len(prompt) - 1)
        logits = lm_head(hidden[start:end])  # (n, V): position i predicts token i + 1
        out += token_logprobs(logits, targets[start:end], k)
    return out
