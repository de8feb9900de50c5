"""What a row's sampler sees instead of the raw logits: logit bias, min_tokens, penalties.

The order is vLLM's: the logit bias and the min_tokens mask first, then the repetition
penalty, then the frequency and presence penalties; temperature, top-k and top-p come after,
in the sampler. Log-probabilities are taken from the raw logits, before any of this.
Each function takes one row's scores (V,) in float32, on the model's device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import torch

from offload_rt.engine.sampling import SamplingParams


def adjust_scores(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int],
    generated: Sequence[int],
    stop_ids: Collection[int],
) -> torch.Tensor:
    """logits (V,) -> the scores (V,) float32 the sampler draws from for this row."""
    scores = logits.float().clone()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        scores[_ids(ids, scores)] += torch.tensor(bias, device=scores.device)
    if len(generated) < params.min_tokens:
        stops = [t for t in stop_ids if 0 <= t < scores.numel()]  # user stop ids may lie outside
        if stops:
            scores[_ids(stops, scores)] = float("-inf")
    if params.repetition_penalty != 1.0:
        repetition_penalty(scores, set(prompt) | set(generated), params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        counts = Counter(generated)
        if counts:
            ids = _ids(list(counts), scores)
            n = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
            scores[ids] -= n * params.frequency_penalty + params.presence_penalty
    return scores


def repetition_penalty(scores: torch.Tensor, seen: Collection[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, in place: a seen token's score is
    divided by `penalty` when positive and multiplied by it when negative (so a penalty > 1
    always makes it less likely)."""
    if not seen:
        return
    ids = _ids(list(seen), scores)
    s = scores[ids]
    scores[ids] = torch.where(s < 0, s * penalty, s / penalty)


def _ids(ids: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=like.device)
