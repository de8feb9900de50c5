"""Perplexity of a model over a text, and how far another model's next-token distributions
are from it (KL divergence, top-1 agreement), as llama.cpp's perplexity tool reports for its
quantizations.

The text is cut into non-overlapping windows of `window` tokens (the last one may be
shorter); each window is one prefill from an empty cache, and every token of it but the first
is scored: the first has no context in its window. (llama.cpp scores only each window's second
half, so that every scored token has at least half a window of context; its figures are lower
for the same window.) Log-probabilities are float32 `log_softmax` of the raw logits, as
`engine/logprobs.py` computes them. Shape legend: T window positions, D hidden, V vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from offload_rt.engine.generate import BatchDecoder
from offload_rt.engine.logprobs import CHUNK_POSITIONS
from offload_rt.engine.runtime import OffloadModel

DEFAULT_WINDOW = 512  # tokens per window when the model's context is longer, as llama.cpp's


@dataclass(frozen=True)
class Comparison:
    """The other model against the evaluated one P, over the same scored tokens."""

    perplexity: float  # the other model's own perplexity
    kl_mean: float  # mean over tokens of KL(P || Q) in nats
    kl_p99: float  # its 99th percentile over tokens
    kl_max: float
    top1_agreement: float  # share of tokens where both models' likeliest next token is the same


@dataclass(frozen=True)
class EvalReport:
    window: int  # tokens per window
    windows: int  # windows evaluated (the last one may be shorter)
    scored: int  # tokens scored: every window's tokens but its first
    mean_nll: float  # mean negative log-likelihood in nats
    seconds: float  # wall time of the whole evaluation, the other model's included
    tokens_per_second: float  # tokens put through the model(s) per second
    against: Comparison | None  # None without another model

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def default_window(model: OffloadModel) -> int:
    return min(model.config.max_position_embeddings, DEFAULT_WINDOW)


def split_windows(ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens; a last remainder of one token is dropped
    (it would score nothing)."""
    cuts = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in cuts if len(w) >= 2]


def evaluate(
    model: OffloadModel,
    ids: list[int],
    window: int | None = None,
    other: OffloadModel | None = None,
    progress: bool = True,
) -> EvalReport:
    """Perplexity of `model` over token ids `ids`, and `other` against it when given."""
    window = default_window(model) if window is None else window
    _check(model, ids, window, other)
    windows = split_windows(ids, window)
    tally = _Tally()
    start = time.perf_counter()
    bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="eval", disable=not progress)
    with bar, torch.inference_mode():
        for w in windows:
            _score_window(model, other, w, tally)
            bar.update(len(w))
    seconds = time.perf_counter() - start
    total = sum(len(w) for w in windows) * (2 if other is not None else 1)
    return EvalReport(
        window=window,
        windows=len(windows),
        scored=sum(len(w) - 1 for w in windows),
        mean_nll=float(torch.cat(tally.nll).mean()),
        seconds=seconds,
        tokens_per_second=total / seconds,
        against=tally.comparison() if other is not None else None,
    )


class _Tally:
    """Per scored token: the model's NLL, and against another model its NLL, KL(P || Q) and
    whether the two argmaxes agree; one float64 tensor per chunk of positions."""

    def __init__(self) -> None:
        self.nll: list[torch.Tensor] = []
        self.other_nll: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []

    def add(self, lp: torch.Tensor, lq: torch.Tensor | None, target: torch.Tensor) -> None:
        """lp, lq: (n, V) float32 log-probabilities of P and Q; target (n,) the next tokens."""
        self.nll.append(-lp.gather(1, target[:, None])[:, 0].double())
        if lq is None:
            return
        self.other_nll.append(-lq.gather(1, target[:, None])[:, 0].double())
        self.kl.append((lp.exp() * (lp - lq)).sum(-1).double())  # sum_v p_v (log p_v - log q_v)
        self.agree.append(lp.argmax(-1) == lq.argmax(-1))

    def comparison(self) -> Comparison:
        divergence = torch.cat(self.kl)
        return Comparison(
            perplexity=math.exp(float(torch.cat(self.other_nll).mean())),
            kl_mean=float(divergence.mean()),
            kl_p99=float(torch.quantile(divergence, 0.99)),
            kl_max=float(divergence.max()),
            top1_agreement=float(torch.cat(self.agree).double().mean()),
        )


def _score_window(
    model: OffloadModel, other: OffloadModel | None, window: list[int], tally: _Tally
) -> None:
    """One prefill of each model over the window, then lm_head CHUNK_POSITIONS positions at
    a time, so that no (T, V) logits are ever held."""
    hidden = _prefill(model, window)  # (T, D)
    other_hidden = _prefill(other, window) if other is not None else None
    target = torch.tensor(window[1:])  # (T - 1,) the token each position predicts
    for s in range(0, len(window) - 1, CHUNK_POSITIONS):
        e = min(s + CHUNK_POSITIONS, len(window) - 1)
        lp = _logprobs(model, hidden[s:e])
        lq = _logprobs(other, other_hidden[s:e]) if other is not None else None
        tally.add(lp, lq, target[s:e])


def _prefill(model: OffloadModel, window: list[int]) -> torch.Tensor:
    """The window's final-normed hidden states (T, D): one prefill from an empty cache."""
    return BatchDecoder(model.model, [window], len(window)).prefill_hidden()[0]


def _logprobs(model: OffloadModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 log_softmax (n, V) of the logits at hidden (n, D), on the CPU."""
    return torch.log_softmax(model.model.logits(hidden).float(), dim=-1).cpu()


def _check(model: OffloadModel, ids: list[int], window: int, other: OffloadModel | None) -> None:
    if window < 2:
        raise ValueError(
            f"window must be at least 2 tokens (one of context, one scored), got {window}"
        )
    models = [model] if other is None else [model, other]
    for m in models:
        context = m.config.max_position_embeddings
        if window > context:
            raise ValueError(
                f"window {window} is longer than {m.checkpoint.folder}'s context {context}"
            )
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    vocab = model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"token id {bad[0]} is outside {model.checkpoint.folder}'s vocabulary of {vocab}"
        )
    if other is not None and other.config.vocab_size != vocab:
        raise ValueError(
            f"{other.checkpoint.folder} has a vocabulary of {other.config.vocab_size} tokens, "
            f"{model.checkpoint.folder} of {vocab}: their distributions cannot be compared"
        )
