"""One choice of an OpenAI answer, whole or chunk by chunk: its text (the echoed prompt
first, when asked), finish reason and log-probabilities in the endpoint's form.

A request of P prompts and n choices each has P x n choices, numbered prompt by prompt
(choice p * n + j is prompt p's j-th), as OpenAI numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from offload_rt.engine import GenerationResult
from offload_rt.engine.logprobs import TokenLogprob
from offload_rt.engine.scheduler import Event
from offload_rt.engine.tokenizer import TextTokenizer
from offload_rt.server.logprobs import chat_logprobs, completion_logprobs, merge_completion, offsets


@dataclass
class CompletionChoice:
    index: int
    tok: TextTokenizer
    prompt: list[int]
    echo: str | None  # the prompt's text when echoed
    logprobs: bool  # whether the request asked for log-probabilities
    started: bool = False  # streaming: the echo went out
    tokens: list[int] = field(default_factory=list)  # streaming: the new tokens so far

    def final(self, r: GenerationResult) -> dict[str, Any]:
        lp = None
        if self.logprobs:
            lp = self._new(r.logprobs or [], r.token_ids)
            if self.echo is not None:
                lp = merge_completion(self._prompt(r.prompt_logprobs or []), lp)
        text = (self.echo or "") + (r.text or "")
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason}

    def chunks(self, e: Event, want_lps: bool) -> list[dict[str, Any]]:
        """The choice entries of the chunks this event makes (maybe none)."""
        out = []
        if not self.started:
            self.started = True
            if self.echo is not None:
                lp = self._prompt(e.prompt_logprobs or []) if self.logprobs else None
                out.append(self._entry(self.echo, lp, None))
        reason = e.result.finish_reason if e.result is not None else None
        lp = self._new(e.logprobs, e.token_ids) if self.logprobs else None
        self.tokens += e.token_ids
        if e.text or reason or (want_lps and e.token_ids):
            out.append(self._entry(e.text, lp, reason))
        return out

    def _entry(self, text: str, lp: dict | None, reason: str | None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}

    def _prompt(self, entries: list[TokenLogprob]) -> dict[str, list[Any]]:
        return completion_logprobs(self.tok, entries, offsets(self.tok, self.prompt, 0))

    def _new(self, entries: list[TokenLogprob], new: list[int]) -> dict[str, list[Any]]:
        """New tokens' log-probabilities; text offsets past the echo and earlier chunks."""
        start = len(self.echo or "")
        at = offsets(self.tok, self.tokens + new, start, first=len(self.tokens))
        return completion_logprobs(self.tok, entries, at)


@dataclass
class ChatChoice:
    index: int
    tok: TextTokenizer
    logprobs: bool

    def final(self, r: GenerationResult) -> dict[str, Any]:
        return {
            "index": self.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(self.tok, r.logprobs or []) if self.logprobs else None,
            "finish_reason": r.finish_reason,
        }

    def first(self) -> dict[str, Any]:
        return self._delta({"role": "assistant", "content": ""}, None, None)

    def chunks(self, e: Event) -> list[dict[str, Any]]:
        lp = chat_logprobs(self.tok, e.logprobs) if self.logprobs and e.logprobs else None
        out = []
        if e.text or lp is not None:
            out.append(self._delta({"content": e.text}, lp, None))
        if e.result is not None:
            out.append(self._delta({}, None, e.result.finish_reason))
        return out

    def _delta(self, delta: dict[str, str], lp: dict | None, reason: str | None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
