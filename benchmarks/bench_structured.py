"""What constrained decoding costs per token: a row's grammar mask (compute the mask, apply it
to the logits, advance the matcher) beside an unconstrained step of the same batch.

Two vocabularies. The demo checkpoint's byte-level tokenizer (259 tokens): its model runs the
steps, so the mask's cost is set against a whole decode step of the test-sized model. And a
realistic BPE tokenizer (32000 tokens by default, Mixtral's size; 151936 is Qwen's) trained
offline with the `tokenizers` library on this machine's Python sources: there the
unconstrained step is what the coordinator does for every token whatever the model's size
after the last layer, lm_head (hidden 4096, Mixtral's) and the argmax over the vocabulary,
against which the mask's work is set. Each row is driven through one fixed JSON document that
the schema accepts (its tokens forced, so every run does the same work); figures are medians
over the runs, per token (a row's step).

    python benchmarks/bench_structured.py                 # demo, and a 32000-token BPE
    python benchmarks/bench_structured.py --vocab 151936 --rows 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import offload_rt
from offload_rt.demo import demo_name, make_demo_checkpoint
from offload_rt.engine.generate import BatchDecoder
from offload_rt.engine.grammar import Grammars, RowGrammar, schema_text
from offload_rt.engine.rows import float_copy

CORPUS_BYTES = 96 << 20  # of Python sources: enough distinct text for 150000 tokens


def bpe_tokenizer(vocab: int) -> Tokenizer:
    """A byte-level BPE of `vocab` tokens (</s> among them), trained on the Python sources
    of the standard library, then of the installed packages, in name order: the same
    tokenizer on every run on this machine."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _corpus():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.rglob("*.py"), key=lambda p: ("site-packages" in p.parts, p))
    left = CORPUS_BYTES
    for path in files:
        text = path.read_text(errors="replace")
        yield text
        left -= len(text)
        if left <= 0:
            return


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = "unknown (no lscpu)"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{stamp}; CPU {cpu}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}"


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
        "kind": {"enum": ["person", "robot", "other"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags", "kind", "address"],
}
DOCUMENT = {
    "name": "Ada Lovelace of the analytical engine",
    "age": 36,
    "tags": ["math", "poetry", "engines", "notes"],
    "kind": "person",
    "address": {"city": "London, Marylebone", "zip": "NW1 5LR"},
}
HIDDEN = 4096  # Mixtral's hidden size: lm_head of the realistic vocabulary's step
Step = Callable[[list[int]], torch.Tensor]  # the rows' forced tokens -> their logits (B, V)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000, help="the BPE tokenizer's size")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="walks over the document")
    return p.parse_args()


def document_tokens(tok: Tokenizer) -> list[int]:
    """The document as the grammar writes it (json.dumps' separators)."""
    return tok.encode(json.dumps(DOCUMENT), add_special_tokens=False).ids


def walk(grammars: Grammars, tokens: list[int], rows: int, step: Step) -> tuple[float, float]:
    """Seconds per token of one walk of `rows` rows through the document: the unconstrained
    step (logits, then argmax), and the mask's work on top (mask, apply, advance)."""
    schema = schema_text(SCHEMA)
    matchers: list[RowGrammar] = [grammars.row(schema) for _ in range(rows)]
    plain = masked = 0.0
    previous = tokens[0]
    for token in tokens:
        start = time.perf_counter()
        logits = step([previous] * rows)  # (B, V)
        torch.argmax(logits, dim=-1).tolist()
        mid = time.perf_counter()
        for i, m in enumerate(matchers):  # as sample_rows does for a constrained row
            scores = float_copy(logits[i])
            m.mask(scores, logits[i])
            int(torch.argmax(scores))
            m.advance(token)
        end = time.perf_counter()
        plain, masked, previous = plain + mid - start, masked + end - mid, token
    assert all(m.done for m in matchers), "the document did not complete the grammar"
    n = len(tokens) * rows
    return plain / n, masked / n


def report(label: str, grammars: Grammars, tokens: list[int], rows: int, step: Step,
           repeats: int) -> None:  # fmt: skip
    walk(grammars, tokens, rows, step)  # warm-up: the lexer's states, the allocator
    runs = [walk(grammars, tokens, rows, step) for _ in range(repeats)]
    plain = statistics.median(p for p, _ in runs)
    masked = statistics.median(m for _, m in runs)
    print(
        f"{label:34s} rows {rows:2d}: unconstrained step {1e6 * plain:9.1f} us/token, "
        f"mask + apply + advance {1e6 * masked:7.1f} us/token, ratio {masked / plain:6.3f}",
        flush=True,
    )


def demo_step(model: offload_rt.OffloadModel, rows: int, length: int) -> Step:
    """The demo model's decode step over `rows` rows, prefilled with one short prompt."""
    prompt = model.encode("JSON:")
    decoder = BatchDecoder(model.model, [prompt] * rows, len(prompt) + length + 2)
    decoder.prefill()
    return lambda tokens: decoder.step(tokens, [True] * len(tokens))


def lm_head_step(vocab: int, rows: int) -> Step:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, HIDDEN, generator=gen) * 0.02  # (V, D)
    hidden = torch.randn(rows, HIDDEN, generator=gen)  # (B, D)
    return lambda tokens: hidden @ weight.T  # (B, V)


def main() -> None:
    args = parse_args()
    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; document "
          f"{json.dumps(DOCUMENT)[:60]}...")  # fmt: skip
    folder = make_demo_checkpoint(Path("/tmp/offload_rt_bench") / demo_name())
    with offload_rt.load(folder) as model:
        assert model.grammars is not None and model.tokenizer is not None
        tokens = document_tokens(model.tokenizer.tokenizer)
        for rows in args.rows:
            step = demo_step(model, rows, len(tokens) * (args.repeats + 2))
            label = f"demo model, vocab {model.config.vocab_size}"
            report(label, model.grammars, tokens, rows, step, args.repeats)
    start = time.perf_counter()
    tok = bpe_tokenizer(args.vocab)
    took = time.perf_counter() - start
    print(f"BPE tokenizer of {tok.get_vocab_size()} tokens trained in {took:.1f} s")
    assert tok.get_vocab_size() == args.vocab, "too little text for this many tokens"
    grammars = Grammars(tok, args.vocab, [tok.token_to_id("</s>")])
    start = time.perf_counter()
    grammars.compile(schema_text(SCHEMA))
    print(f"first compile (the tokenizer's tables, then the schema): "
          f"{1e3 * (time.perf_counter() - start):.0f} ms")  # fmt: skip
    start = time.perf_counter()
    grammars.compile(schema_text({**SCHEMA, "title": "another"}))
    print(f"a second schema: {1e3 * (time.perf_counter() - start):.1f} ms")
    tokens = document_tokens(tok)
    for rows in args.rows:
        label = f"lm_head {HIDDEN} x {args.vocab} + argmax"
        report(label, grammars, tokens, rows, lm_head_step(args.vocab, rows), args.repeats)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
