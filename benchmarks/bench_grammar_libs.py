"""The grammar libraries side by side: llguidance, xgrammar and outlines-core on the demo's
byte-level tokenizer and on a 32000-token BPE tokenizer trained offline, through the
`tokenizers` library alone (no transformers, no download).

For each library and tokenizer: whether it builds from the tokenizer.json (or what it needs),
the time to compile one JSON schema, and the per-token cost of computing a row's mask and
advancing its matcher over a document the schema accepts. A library that is not importable is
reported as such; put the ones the project does not depend on beside it with
`pip install --no-deps --target DIR NAME` and name the folders in PYTHONPATH:

    PYTHONPATH=.:/tmp/gl/xg:/tmp/gl/oc python benchmarks/bench_grammar_libs.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
from bench_structured import DOCUMENT, SCHEMA, bpe_tokenizer, machine
from tokenizers import Tokenizer

from offload_rt.demo import byte_level_tokenizer
from offload_rt.engine.tokenizer import TextTokenizer

Step = Callable[[int], None]  # mask for the next token, then advance by this one


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000, help="the BPE tokenizer's size")
    p.add_argument("--repeats", type=int, default=5, help="walks over the document")
    return p.parse_args()


def llguidance_walk(tok: Tokenizer, eos: int, tokens: list[int]) -> tuple[float, Step]:
    import llguidance
    import llguidance.numpy

    lltok = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    mask = llguidance.numpy.allocate_token_bitmask(1, lltok.vocab_size)

    def step(token: int) -> None:
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
        assert matcher.consume_token(token), matcher.get_error()

    return compile_s, step


def xgrammar_walk(tok: Tokenizer, eos: int, tokens: list[int]) -> tuple[float, Step]:
    import xgrammar

    text = TextTokenizer(tok)
    vocab = [text.token_bytes(i) for i in range(tok.get_vocab_size())]
    info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, stop_token_ids=[eos])
    start = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info, max_threads=1).compile_json_schema(
        SCHEMA, any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - start
    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)

    def step(token: int) -> None:
        matcher.fill_next_token_bitmask(mask, 0)
        assert matcher.accept_token(token)

    return compile_s, step


def outlines_walk(tok: Tokenizer, eos: int, tokens: list[int]) -> tuple[float, Step]:
    import outlines_core

    text = TextTokenizer(tok)
    vocab: dict[bytes, list[int]] = {}
    for i in range(tok.get_vocab_size()):
        if i != eos:
            vocab.setdefault(text.token_bytes(i), []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, vocab)
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    start = time.perf_counter()
    index = outlines_core.Index(regex, vocabulary)
    compile_s = time.perf_counter() - start
    guide = outlines_core.Guide(index)
    mask = np.zeros((tok.get_vocab_size() + 31) // 32, dtype=np.int32)

    def step(token: int) -> None:
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        guide.advance(token)

    return compile_s, step


LIBRARIES = {
    "llguidance": llguidance_walk,
    "xgrammar": xgrammar_walk,
    "outlines-core": outlines_walk,
}


def measure(name: str, tok: Tokenizer, eos: int, repeats: int) -> str:
    tokens = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).ids
    try:
        walks = [LIBRARIES[name](tok, eos, tokens) for _ in range(repeats)]
    except ImportError as e:
        return f"{name:14s} not importable ({e})"
    per_token = []
    for _, step in walks:
        start = time.perf_counter()
        for t in tokens:
            step(t)
        per_token.append((time.perf_counter() - start) / len(tokens))
    compile_ms = 1e3 * statistics.median(c for c, _ in walks)
    return (
        f"{name:14s} vocab {tok.get_vocab_size():6d}: compile {compile_ms:8.1f} ms, "
        f"mask + advance {1e6 * statistics.median(per_token):8.1f} us/token "
        f"over {len(tokens)} tokens"
    )


def main() -> None:
    args = parse_args()
    print(machine())
    demo = byte_level_tokenizer()
    big = bpe_tokenizer(args.vocab)
    for tok in (demo, big):
        eos = tok.token_to_id("</s>")
        for name in LIBRARIES:
            print(measure(name, tok, eos, args.repeats), flush=True)


if __name__ == "__main__":
    main()
