"""Tier 4: log-probabilities through the real `openai` client (completions and chat, whole
and streamed, echo with max_tokens 0 for a concurrent batch) and the Python client, each
against log_softmax of the transformers reference's float32 logits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import offload_rt
from tests.server.conftest import MODEL_NAME
from tests.server.test_openai import _chat_prompt

TOL = 1e-4
PROMPTS = ["Hello", "The quick brown fox jumps", "offload", "Mixtral runs on one small GPU, yes"]


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def ids_of(demo_model):
    """Token id of each token as the API spells it: its text, or bytes:\\xNN."""
    tok, vocab = demo_model.tokenizer, demo_model.config.vocab_size
    by_text = {tok.token_text(i): i for i in range(vocab)}
    by_bytes = {bytes(tok.token_bytes(i)): i for i in range(vocab)}
    assert len(by_text) == len(by_bytes) == vocab  # every token has its own spelling
    return by_text, by_bytes


def reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_completion_form(lp, ref_rows, ids, by_text, k) -> None:
    """lp: OpenAI's completions logprobs of positions whose distributions are ref_rows."""
    assert [by_text[t] for t in lp.tokens] == ids
    for token, got, top, row in zip(ids, lp.token_logprobs, lp.top_logprobs, ref_rows):
        assert abs(got - row[token].item()) <= TOL
        want = set(torch.topk(row, k).indices.tolist()) | {token}  # top k, and the token
        assert {by_text[t] for t in top} == want
        assert max(abs(v - row[by_text[t]].item()) for t, v in top.items()) <= TOL


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_completion_logprobs_equal_the_reference(client, demo_model, demo_reference, ids_of,
                                                 temperature):  # fmt: skip
    by_text, _ = ids_of
    prompt = demo_model.encode(PROMPTS[1])
    got = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=8, temperature=temperature, seed=4,
        logprobs=5, frequency_penalty=1.0,
    )  # fmt: skip
    lp = got.choices[0].logprobs
    new = [by_text[t] for t in lp.tokens]
    assert len(new) == 8 and demo_model.tokenizer.decode(new) == got.choices[0].text
    rows = reference(demo_reference, prompt + new)[len(prompt) - 1 : -1]
    check_completion_form(lp, rows, new, by_text, 5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_streamed_completion_logprobs_equal_the_whole_answer(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == whole.logprobs.tokens
    assert [t for lp in streamed for t in lp.text_offset] == whole.logprobs.text_offset
    got = [v for lp in streamed for v in lp.token_logprobs]
    assert max(abs(a - b) for a, b in zip(got, whole.logprobs.token_logprobs)) <= TOL
    assert "".join(c.text for c in chunks) == whole.text


def test_echo_without_new_tokens_scores_a_concurrent_batch_of_prompts(
    client, demo_model, demo_reference, ids_of
):
    by_text, _ = ids_of

    def score(prompt: str | list[str]):
        got = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=3
        )
        return sorted(got.choices, key=lambda c: c.index)

    with ThreadPoolExecutor(3) as pool:  # the first request a batch of prompts, then alone
        answers = list(pool.map(score, [PROMPTS[:2], PROMPTS[2], PROMPTS[3]]))
    choices = answers[0] + answers[1] + answers[2]
    for text, choice in zip(PROMPTS, choices):
        ids = demo_model.encode(text)
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert [by_text[t] for t in lp.tokens] == ids
        check_completion_form(
            _positions(lp, 1), reference(demo_reference, ids)[:-1], ids[1:], by_text, 3
        )
        assert lp.text_offset == [
            len(demo_model.tokenizer.decode(ids[:i])) for i in range(len(ids))
        ]


def _positions(lp, start: int):
    """The logprobs from position `start` on (the echo's first token has no distribution)."""
    return type(lp)(
        tokens=lp.tokens[start:], token_logprobs=lp.token_logprobs[start:],
        top_logprobs=lp.top_logprobs[start:], text_offset=lp.text_offset[start:],
    )  # fmt: skip


def test_echo_with_new_tokens_puts_the_prompt_first(client, demo_model):
    want = demo_model.generate(PROMPTS[0], max_new_tokens=4)
    got = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, echo=True, temperature=0, logprobs=1
    ).choices[0]
    assert got.text == PROMPTS[0] + want.text
    n = len(demo_model.encode(PROMPTS[0]))
    assert len(got.logprobs.tokens) == n + 4 and got.logprobs.text_offset[n] == len(PROMPTS[0])


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_reference(client, demo_model, demo_reference, ids_of, stream):
    _, by_bytes = ids_of
    messages = [{"role": "user", "content": "Tell me about experts."}]
    prompt = _chat_prompt(demo_model, messages)
    got = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0.8, seed=2,
        logprobs=True, top_logprobs=4, stream=stream,
    )  # fmt: skip
    if stream:
        entries = [e for c in got if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]  # fmt: skip
    else:
        entries = got.choices[0].logprobs.content
    new = [by_bytes[bytes(e.bytes)] for e in entries]
    assert len(new) == 6
    rows = reference(demo_reference, prompt + new)[len(prompt) - 1 : -1]
    for e, token, row in zip(entries, new, rows):
        assert abs(e.logprob - row[token].item()) <= TOL
        assert [by_bytes[bytes(t.bytes)] for t in e.top_logprobs] == torch.topk(
            row, 4
        ).indices.tolist()
        assert (
            max(abs(t.logprob - row[by_bytes[bytes(t.bytes)]].item()) for t in e.top_logprobs)
            <= TOL
        )
        assert e.token == demo_model.tokenizer.token_text(token)


def test_python_client_gets_the_local_models_logprobs(live, demo_model):
    kw = dict(max_new_tokens=6, logprobs=3, prompt_logprobs=2, temperature=0.7, seed=9)
    want = demo_model.generate(PROMPTS[1], **kw)
    with offload_rt.connect(live.url) as remote:
        got = remote.generate(PROMPTS[1], **kw)
        scored = remote.generate([PROMPTS[0], [1, 40, 41]], max_new_tokens=0, prompt_logprobs=0)
    assert got.token_ids == want.token_ids
    for mine, theirs in (
        (got.logprobs, want.logprobs),
        (got.prompt_logprobs, want.prompt_logprobs),
    ):
        assert [(e.token, [t for t, _ in e.top]) for e in mine] == [
            (e.token, [t for t, _ in e.top]) for e in theirs
        ]
        pairs = [(a.logprob, b.logprob) for a, b in zip(mine, theirs) if a.logprob is not None]
        assert max(abs(a - b) for a, b in pairs) <= TOL
    assert [len(r.prompt_logprobs) for r in scored] == [len(demo_model.encode(PROMPTS[0])), 3]
    assert all(r.token_ids == [] and r.logprobs is None for r in scored)


def test_the_prompts_and_choices_of_one_request_share_one_prefill(client, demo_model):
    forwards: list[tuple[int, ...]] = []
    forward = demo_model.model.forward

    def counting(tokens, *args, **kwargs):
        forwards.append(tuple(tokens.shape))
        return forward(tokens, *args, **kwargs)

    demo_model.model.forward = counting
    try:
        prompts = [PROMPTS[0], PROMPTS[3]]
        got = client.completions.create(
            model=MODEL_NAME, prompt=prompts, n=3, max_tokens=0, echo=True, logprobs=1
        )
        assert len(got.choices) == 6 and {c.text for c in got.choices} == set(prompts)
        longest = max(len(demo_model.encode(p)) for p in prompts)
        assert forwards == [(2, longest)]  # one forward; each prompt in it once
    finally:
        demo_model.model.forward = forward
