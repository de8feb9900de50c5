"""Tier 2: penalties, logit_bias, min_tokens and ignore_eos. Greedy tokens equal a reference
loop written here from the definitions (OpenAI's presence and frequency penalties,
transformers' repetition penalty) and applied to the transformers reference's logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler import Collector

PROMPT = [1, 17, 42, 99, 5, 63, 17, 42]
EOS = 2  # the reference config's


def reference_loop(hf, prompt: list[int], n: int, stops=(EOS,), **kw) -> list[int]:
    """Greedy tokens, recomputing transformers' logits over the whole sequence each step."""
    presence, frequency = kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0)
    rep, bias = kw.get("repetition_penalty", 1.0), dict(kw.get("logit_bias", {}))
    min_tokens, ignore_eos = kw.get("min_tokens", 0), kw.get("ignore_eos", False)
    ends = [t for t in stops if not (ignore_eos and t == EOS)]
    out: list[int] = []
    while len(out) < n:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        for t, b in bias.items():
            logits[t] += b
        if len(out) < min_tokens:
            for t in ends:
                logits[t] = float("-inf")
        for t in set(prompt + out):  # divides a positive logit, multiplies a negative one
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t, count in Counter(out).items():
            logits[t] -= count * frequency + presence
        out.append(int(torch.argmax(logits)))
        if out[-1] in ends:
            break
    return out


CASES = {
    "presence_frequency": dict(presence_penalty=1.5, frequency_penalty=0.8),
    "negative_presence": dict(presence_penalty=-2.0, frequency_penalty=0.3),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_one": dict(repetition_penalty=0.6),
    "all_together": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3),
    "bias_bans_and_favours": dict(logit_bias={54: -100.0, 7: 2.5, 123: -3.0}),
    "min_tokens_masks_eos": dict(logit_bias={EOS: 6.0}, min_tokens=5),
    "ignore_eos": dict(logit_bias={EOS: 6.0}, ignore_eos=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_the_reference_loop(model, reference, case):
    _, hf = reference
    kw = CASES[case]
    want = reference_loop(hf, PROMPT, 14, **kw)
    got = model.generate(PROMPT, max_new_tokens=14, **kw)
    assert got.token_ids == want
    plain = model.generate(PROMPT, max_new_tokens=14).token_ids
    assert want != plain  # the option changes the greedy run: the comparison means something


def test_min_tokens_then_eos_and_ignore_eos_change_where_generation_ends(model):
    biased = model.generate(PROMPT, max_new_tokens=14, logit_bias={EOS: 6.0})
    assert biased.token_ids == [EOS] and biased.finish_reason == "stop"
    held = model.generate(PROMPT, max_new_tokens=14, logit_bias={EOS: 6.0}, min_tokens=5)
    assert len(held.token_ids) == 6 and held.token_ids[-1] == EOS
    assert EOS not in held.token_ids[:5] and held.finish_reason == "stop"
    on = model.generate(PROMPT, max_new_tokens=14, logit_bias={EOS: 6.0}, ignore_eos=True)
    assert len(on.token_ids) == 14 and on.finish_reason == "length"


def test_each_row_of_a_continuous_batch_keeps_its_own_options(model):
    options = [CASES[c] for c in sorted(CASES)] + [{}]
    prompts = [PROMPT[: 3 + i] for i in range(len(options))]
    solo = [model.generate(p, max_new_tokens=10, **kw).token_ids for p, kw in zip(prompts, options)]
    sched = Scheduler(model.model, model.config.eos_token_ids, None, SchedulerConfig(max_batch=4))
    try:
        collectors = [Collector() for _ in options]
        for p, kw, c in zip(prompts, options, collectors):
            sched.submit(p, SamplingParams(max_new_tokens=10, **kw), c)
        got = [c.wait()[-1].result.token_ids for c in collectors]
    finally:
        sched.close()
    assert got == solo


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias={500: 1.0}), r"logit_bias: token ids must lie in \[0, 128\)"),
        (dict(logit_bias={-1: 1.0}), "logit_bias token id"),
        (dict(logit_bias={3: "x"}), "logit_bias of token 3"),
        (dict(logit_bias={3: 101}), "logit_bias of token 3"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=20), "min_tokens"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_bad_values_are_refused_naming_the_field(model, kw, fragment):
    with pytest.raises(RequestError, match=fragment):
        model.generate(PROMPT, max_new_tokens=10, **kw)
