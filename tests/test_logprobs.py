"""Tier 2: log-probabilities of new and prompt tokens equal log_softmax of the transformers
reference's float32 logits, whatever the sampling; a static batch and the scheduler agree."""

from __future__ import annotations

import pytest
import torch

from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.logprobs import CHUNK_POSITIONS, prompt_logprobs
from offload_rt.engine.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import Collector

TOL = 1e-4
PROMPTS = [[1, 17, 42, 99, 5, 63], [1, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def reference_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' float32 log_softmax at every position of `ids`: (len, V)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_against(ref: torch.Tensor, lps, k: int) -> None:
    """ref (N, V): row i is the distribution that lps[i]'s token was drawn from."""
    assert len(lps) == ref.shape[0]
    for row, lp in zip(ref, lps):
        assert abs(lp.logprob - row[lp.token].item()) <= TOL
        top = torch.topk(row, k)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lp.top, top.values.tolist())) <= TOL


def assert_close(got, want) -> None:
    assert [(g.token, [t for t, _ in g.top]) for g in got] == [
        (w.token, [t for t, _ in w.top]) for w in want
    ]
    flat = [(g.logprob, w.logprob) for g, w in zip(got, want)]
    flat += [(a, b) for g, w in zip(got, want) for (_, a), (_, b) in zip(g.top, w.top)]
    assert max(abs(a - b) for a, b in flat) <= TOL


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_new_token_logprobs_are_the_models_own_before_sampling(model, reference, temperature):
    _, hf = reference
    kw = dict(max_new_tokens=10, temperature=temperature, seed=5, logprobs=4)
    r = model.generate(PROMPTS[0], presence_penalty=1.0, top_k=20, **kw)
    ref = reference_logprobs(hf, PROMPTS[0] + r.token_ids)[len(PROMPTS[0]) - 1 : -1]
    assert [lp.token for lp in r.logprobs] == r.token_ids
    check_against(ref, r.logprobs, 4)


def test_prompt_logprobs_of_a_batch_of_lengths_without_new_tokens(model, reference):
    _, hf = reference
    results = model.generate(PROMPTS, max_new_tokens=0, prompt_logprobs=3)
    for p, r in zip(PROMPTS, results):
        assert r.token_ids == [] and r.logprobs is None
        first, rest = r.prompt_logprobs[0], r.prompt_logprobs[1:]
        assert (first.token, first.logprob, first.top) == (p[0], None, ())
        assert [lp.token for lp in rest] == p[1:]
        check_against(reference_logprobs(hf, p)[:-1], rest, 3)


def test_scheduler_scores_prompts_in_one_prefill_and_generates_beside(model):
    want = model.generate(PROMPTS, max_new_tokens=0, prompt_logprobs=2)
    gen = model.generate(PROMPTS[0], max_new_tokens=5, logprobs=1)
    sched = Scheduler(model.model, model.config.eos_token_ids, None, SchedulerConfig(max_batch=8))
    forwards: list[tuple[int, ...]] = []
    forward = model.model.forward

    def counting(tokens, *args, **kwargs):
        forwards.append(tuple(tokens.shape))
        return forward(tokens, *args, **kwargs)

    model.model.forward = counting
    try:
        collectors = [Collector() for _ in range(len(PROMPTS) * 2 + 1)]
        score = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
        items = [(PROMPTS[i // 2], score, c) for i, c in enumerate(collectors[:-1])]  # n = 2
        items.append((PROMPTS[0], SamplingParams(max_new_tokens=5, logprobs=1), collectors[-1]))
        sched.submit_together(items)  # one step boundary for all
        results = [c.wait()[-1].result for c in collectors]
    finally:
        model.model.forward = forward
        sched.close()
    for i, r in enumerate(results[:-1]):
        assert r.prompt_logprobs == want[i // 2].prompt_logprobs and r.token_ids == []
    assert results[-1].token_ids == gen.token_ids
    assert_close(results[-1].logprobs, gen.logprobs)  # a batch's sums differ in the last bits
    longest = max(len(p) for p in PROMPTS)
    assert forwards[0] == (len(PROMPTS), longest)  # one prefill; each prompt in it once


def test_a_long_prompt_is_scored_in_chunks(model, reference):
    _, hf = reference
    n = CHUNK_POSITIONS + 40  # over one chunk; the tiny model's context is 256, so score here
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 128, (n,), generator=gen).tolist()
    hidden = torch.randn(n, model.config.hidden_size, generator=gen)
    whole = torch.log_softmax(model.model.logits(hidden[:-1]).float(), dim=-1)
    lps = prompt_logprobs(hidden, ids, 2, model.model.logits)
    assert len(lps) == n and lps[0].logprob is None
    check_against(whole, lps[1:], 2)


def test_a_scored_prompt_may_fill_the_context_and_bad_values_are_refused(model):
    context = model.config.max_position_embeddings
    r = model.generate([1] * context, max_new_tokens=0, prompt_logprobs=0)
    assert len(r.prompt_logprobs) == context and r.prompt_logprobs[1].top == ()
    with pytest.raises(RequestError, match="no room"):
        model.generate([1] * context, max_new_tokens=1, prompt_logprobs=0)
    for kw, field in [
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(logprobs=1.5), "logprobs"),
        (dict(echo=True), "unknown sampling arguments: echo"),
    ]:
        with pytest.raises(RequestError, match=field):
            model.generate(PROMPTS[0], **kw)


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies(demo):
    from tokenizers import Tokenizer, decoders, models

    from offload_rt.engine.tokenizer import TextTokenizer

    tok = demo.tokenizer  # byte-level: one token per byte
    ids = tok.encode("é!")
    assert [tok.token_bytes(i) for i in ids] == [b"<s>", b"\xc3", b"\xa9", b"!"]
    assert [tok.token_text(i) for i in ids] == ["<s>", "bytes:\\xc3", "bytes:\\xa9", "!"]
    assert tok.prefix_lengths(ids) == [0, 0, 1, 1]  # the half character decodes to U+FFFD
    vocab = {"<unk>": 0, "<s>": 1, "\u2581the": 2, "<0x0A>": 3, "<0xC3>": 4, "é": 5}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )  # fmt: skip  (Mistral's and Llama's tokenizer.json decoder)
    sp_tok = TextTokenizer(sp)
    assert [sp_tok.token_bytes(i) for i in range(1, 6)] == [
        b"<s>",
        b" the",
        b"\n",
        b"\xc3",
        "é".encode(),
    ]
    assert sp_tok.token_text(4) == "bytes:\\xc3" and sp_tok.token_text(2) == " the"
