"""Tier 1: sampling, stopping, batching rules and request errors of `generate`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import offload_rt
from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.rows import greedy_tokens
from offload_rt.engine.sampling import Sampler

PROMPT = [1, 17, 42, 99, 5, 63]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, top_k=50, stop=[])
    a = model.generate(PROMPT, seed=7, **kw).token_ids
    assert model.generate(PROMPT, seed=7, **kw).token_ids == a
    assert model.generate(PROMPT, seed=8, **kw).token_ids != a
    greedy = model.generate(PROMPT, max_new_tokens=20, stop=[]).token_ids
    assert a != greedy


def test_sampled_batch_rows_equal_their_solo_runs(model):
    prompts = [PROMPT, [1, 3], [1, 8, 9, 10, 11, 12, 13, 14, 15]]
    kw = dict(max_new_tokens=12, temperature=0.9, seed=3)
    solo = [model.generate(p, **kw).token_ids for p in prompts]
    assert [r.token_ids for r in model.generate(prompts, **kw)] == solo


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=10).token_ids
    assert (
        model.generate(PROMPT, max_new_tokens=10, temperature=2.0, top_k=1, seed=1).token_ids
        == greedy
    )
    assert (
        model.generate(PROMPT, max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=1).token_ids
        == greedy
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_tokens_are_torchs_argmax_ties_and_nans_included(dtype):
    """The CPU's greedy pick (numpy's argmax) is torch's: the first of equal scores, the first
    NaN where a row has one."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 32000, generator=gen).to(dtype)
    scores[1, 7] = scores[1, 9000] = scores[1].max() + 1  # a tie
    scores[2, 123], scores[2, 456] = float("nan"), float("nan")
    scores[3] = 0.0  # all equal
    want = torch.argmax(scores, dim=-1).tolist()
    assert greedy_tokens(scores) == want and want[1:] == [7, 123, 0]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = set()
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    for _ in range(300):
        seen.add(sampler.sample(logits))
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: the rest never drawn


def test_stop_token_ids_and_max_new_tokens(model):
    full = model.generate(PROMPT, max_new_tokens=20, stop=[]).token_ids
    target = full[5]
    first = full.index(target)
    r = model.generate(PROMPT, max_new_tokens=20, stop=[target])
    assert r.token_ids == full[: first + 1] and r.finish_reason == "stop"
    r = model.generate(PROMPT, max_new_tokens=4)
    assert len(r.token_ids) == 4 and r.finish_reason == "length"
    assert model.generate(PROMPT, max_new_tokens=0).token_ids == []


def test_eos_from_config_ends_generation(reference, tmp_path):
    folder, _ = reference
    with offload_rt.load(folder) as m:
        full = m.generate(PROMPT, max_new_tokens=16).token_ids
    eos = full[3]
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "eos_token_id": [7, eos]}))
    with offload_rt.load(tmp_path / "m") as m:
        r = m.generate(PROMPT, max_new_tokens=16)
    assert r.token_ids == full[: full.index(eos) + 1] and r.finish_reason == "stop"


def test_stop_strings_cut_the_text(demo):
    full = demo.generate("Hello", max_new_tokens=24, stop=[])
    assert len(full.text) > 6
    stop = full.text[4:6]
    r = demo.generate("Hello", max_new_tokens=24, stop=stop)
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.find(stop)]
    assert stop not in r.text
    assert full.token_ids[: len(r.token_ids)] == r.token_ids


def test_text_prompts_use_the_tokenizer(demo):
    ids = demo.encode("héllo")
    assert ids[0] == 1 and len(ids) == 1 + len("héllo".encode())
    assert demo.tokenizer.decode(ids) == "héllo"
    r = demo.generate("héllo", max_new_tokens=5)
    assert demo.generate(ids, max_new_tokens=5).token_ids == r.token_ids
    assert r.text == demo.tokenizer.decode(r.token_ids)


def test_prompt_beyond_the_context_is_refused(model):
    context = model.config.max_position_embeddings
    with pytest.raises(RequestError, match=f"{context} tokens; the context length is {context}"):
        model.generate([1] * context)
    # a prompt that fits but leaves fewer slots than asked stops at the context's end
    r = model.generate([1] * (context - 3), max_new_tokens=10)
    assert len(r.token_ids) <= 3 and r.finish_reason in ("length", "stop")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop=[1.5]), "stop"),
        (dict(stop=[""]), "stop strings"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, fragment):
    with pytest.raises(RequestError, match=fragment):
        model.generate(PROMPT, **kwargs)


def test_bad_prompts(model):
    with pytest.raises(RequestError, match="empty"):
        model.generate([])
    with pytest.raises(RequestError, match=r"\[0, 128\)"):
        model.generate([1, 500])
    with pytest.raises(RequestError, match="no tokenizer.json"):
        model.generate("text without a tokenizer")
    with pytest.raises(RequestError, match="integer token ids"):
        model.generate([1, "a", 2.5])


def test_closed_model_refuses_work(reference):
    m = offload_rt.load(reference[0])
    with m:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        m.generate(PROMPT)


def test_warm_loads_every_expert_once(reference):
    with offload_rt.load(reference[0]) as m:
        assert m.warm() == 16 and m.stats()["misses"] == 16
        m.generate(PROMPT, max_new_tokens=4)
        assert m.stats()["misses"] == 16  # nothing left to load
    with offload_rt.load(reference[0], cache_experts=3) as m:
        assert m.warm() == 3 and m.stats()["resident_max"] == 3
