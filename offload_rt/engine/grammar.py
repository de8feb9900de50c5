"""Constrained decoding: a row whose output must follow a JSON schema samples only the tokens
its grammar allows next.

llguidance (docs/serving.md says why this library) compiles a schema against the model's
tokenizer.json into a matcher; each step, the matcher's bitmask of allowed tokens turns the
others' scores to -inf before the row samples, and the sampled token advances the matcher.
The row ends ("stop") once the grammar is complete; EOS is allowed only where the grammar
may end. A schema is compiled once (the first request that names it) and every later row
takes a copy of that matcher. Shape legend: V vocabulary, W = ceil(V / 32) words.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer

from offload_rt.results import RequestError

CACHE_SCHEMAS = 64  # distinct schemas kept compiled; the least recently used goes first
# compact JSON with json.dumps' separators: a model cannot pad its output with whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_text(schema: object) -> str:
    """A JSON schema (a mapping or its JSON text) as JSON text; RequestError unless it is a
    JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise RequestError(f"json_schema is not valid JSON: {e}") from e
    if not isinstance(schema, Mapping):
        raise RequestError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RequestError(f"json_schema is not JSON: {e}") from e


class RowGrammar:
    """One row's matcher: what may come next, advanced by each token the row samples."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS could follow."""
        return self.matcher.is_stopped()

    def fill(self, bits: np.ndarray) -> None:
        """The allowed tokens into bits (W,) int32, bit t % 32 of word t // 32."""
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)

    def mask(self, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """In place: scores (V,) float32 keep only the tokens the grammar allows next. When
        nothing is left (min_tokens masking the only stop the grammar allows), the allowed
        tokens take the raw logits (V,): the grammar wins. On the CPU through numpy (one
        thread): torch spreads an elementwise op over a large vocabulary across its threads,
        and on a busy machine each such op waits milliseconds for them."""
        vocab = scores.shape[-1]
        bits = np.zeros((vocab + 31) // 32, dtype=np.int32)  # (W,)
        self.fill(bits)
        banned = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab] == 0  # (V,)
        if scores.device.type != "cpu":
            banned_t = torch.from_numpy(banned).to(scores.device)
            scores.masked_fill_(banned_t, float("-inf"))
            if bool(torch.isneginf(scores).all()):
                scores.copy_(logits).masked_fill_(banned_t, float("-inf"))
            return
        view = scores.numpy()
        np.copyto(view, -np.inf, where=banned)
        if view.max() == -np.inf:
            view[:] = logits.float().numpy()
            np.copyto(view, -np.inf, where=banned)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")


class Grammars:
    """Compiles JSON schemas against one tokenizer, once per distinct schema (thread-safe:
    the server compiles off the scheduler's thread, the scheduler takes copies)."""

    def __init__(self, tokenizer: Tokenizer, vocab: int, eos_ids: Sequence[int]) -> None:
        self.source = tokenizer
        self.vocab = vocab  # the model's logits (V,); the tokenizer's may be fewer
        self.eos_ids = list(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # schemas compiled so far (a schema evicted and named again counts twice)

    def compile(self, schema: str) -> None:
        """Compile `schema` (JSON text) unless it is cached; RequestError naming what the
        library cannot compile."""
        self._template(schema)

    def row(self, schema: str) -> RowGrammar:
        """A fresh matcher for one row, at the start of the schema's output."""
        return RowGrammar(self._template(schema).deep_copy())

    def _template(self, schema: str) -> llguidance.LLMatcher:
        with self._lock:
            matcher = self._compiled.get(schema)
            if matcher is not None:
                self._compiled.move_to_end(schema)
                return matcher
        matcher = self._build(schema)  # outside the lock: a big schema takes a while
        with self._lock:
            self.compiled += 1
            self._compiled[schema] = matcher
            while len(self._compiled) > CACHE_SCHEMAS:
                self._compiled.popitem(last=False)
        return matcher

    def _build(self, schema: str) -> llguidance.LLMatcher:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise RequestError(f"json_schema cannot be compiled: {e}"[:2000]) from e
        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise RequestError(f"json_schema cannot be compiled: {error}"[:2000])
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"json_schema cannot be compiled: {matcher.get_error()}"[:2000])
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (a second or so for a large vocabulary), then kept."""
        with self._lock:
            if self._tokenizer is None:
                tok = Tokenizer.from_str(self.source.to_str())
                tok.no_padding()
                tok.no_truncation()
                size = max(self.vocab, tok.get_vocab_size(with_added_tokens=True))
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        tok.to_str(), n_vocab=size, eos_token=self.eos_ids or None
                    )
                except (ValueError, RuntimeError) as e:
                    raise RequestError(
                        f"this model's tokenizer cannot drive constrained decoding: {e}"
                    ) from e
            return self._tokenizer
