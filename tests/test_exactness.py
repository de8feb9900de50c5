"""Tier 2: the local runtime against the transformers reference, in float32."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.engine import BatchDecoder
from tests.conftest import save_reference

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: not about threads

PROMPTS = [
    [1, 17, 42, 99, 5, 63, 88, 12, 7, 101, 33, 64, 3, 77, 21, 9, 55, 120, 4, 8],
    [1, 11, 60],
    [1, 90, 14, 27, 71, 38, 45],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
]
NEW_TOKENS = 32


def reference_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, cut after its first EOS as ours stops there."""
    eos = hf.config.eos_token_id
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.fixture(params=["single", "sharded"])
def checkpoint(request, reference, sharded_reference):
    return reference if request.param == "single" else sharded_reference


def test_logits_match_reference(checkpoint):
    folder, hf = checkpoint
    with offload_rt.load(folder) as model:
        for prompt in PROMPTS:
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0]
            ours = model.logits(prompt)
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_tokens_match_reference(checkpoint):
    folder, hf = checkpoint
    with offload_rt.load(folder) as model:
        results = [model.generate(p, max_new_tokens=NEW_TOKENS) for p in PROMPTS]
    refs = [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    assert [r.token_ids for r in results] == refs
    # the comparison covers full-length runs, not only early EOS stops
    assert any(len(r.token_ids) == NEW_TOKENS for r in results)
    for r in results:
        assert r.finish_reason == ("length" if len(r.token_ids) == NEW_TOKENS else "stop")


def test_incremental_decode_equals_one_shot_prefill(reference):
    folder, _ = reference
    with offload_rt.load(folder) as model:
        prompt = PROMPTS[0]
        greedy = model.generate(prompt, max_new_tokens=24, stop=[]).token_ids
        decoder = BatchDecoder(model.model, [prompt], len(prompt) + len(greedy))
        step_logits = [decoder.prefill()[0]]
        for tok in greedy[:-1]:
            step_logits.append(decoder.step([tok], [True])[0])
        one_shot = model.logits(prompt + greedy[:-1])[len(prompt) - 1 :]
    incremental = torch.stack(step_logits)
    assert incremental.shape == one_shot.shape
    assert (incremental - one_shot).abs().max().item() <= 1e-5
    assert incremental.argmax(-1).tolist() == greedy


def test_batch_of_different_lengths_gives_each_its_solo_tokens(checkpoint):
    folder, hf = checkpoint
    with offload_rt.load(folder) as model:
        solo = [model.generate(p, max_new_tokens=NEW_TOKENS).token_ids for p in PROMPTS]
        batch = model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in batch] == solo
    assert solo == [reference_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]
    assert [r.prompt_tokens for r in batch] == [len(p) for p in PROMPTS]


@pytest.mark.parametrize("cache_experts", [1, 2, 3, 7, 16])
def test_any_cache_size_gives_identical_outputs(reference, cache_experts):
    folder, _ = reference
    with offload_rt.load(folder) as full:
        want_logits = full.logits(PROMPTS[0])
        want = [r.token_ids for r in full.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    with offload_rt.load(folder, cache_experts=cache_experts) as model:
        assert torch.equal(model.logits(PROMPTS[0]), want_logits)
        got = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
        stats = model.stats()
    assert got == want
    assert stats["resident_max"] <= cache_experts
    assert stats["misses"] >= stats["resident_max"]
    if cache_experts < 16:  # the tiny model has 2 layers x 8 experts
        assert stats["evictions"] > 0


@pytest.mark.parametrize(
    "overrides", [{"sliding_window": 5}, {"tie_word_embeddings": True}, {"head_dim": 24}]
)
def test_config_variants_match_reference(tmp_path, overrides):
    hf = save_reference(tmp_path, seed=3, **overrides)
    prompt = PROMPTS[0]
    with offload_rt.load(tmp_path, cache_experts=4) as model:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert (model.logits(prompt) - ref).abs().max().item() <= 1e-4
        assert model.generate(prompt, max_new_tokens=16).token_ids == reference_greedy(
            hf, prompt, 16
        )


def test_bfloat16_stays_close_to_float32(reference):
    folder, hf = reference
    with offload_rt.load(folder, dtype="bfloat16") as model:
        assert model.model.weights.embed.dtype == torch.bfloat16
        ours = model.logits(PROMPTS[0]).float()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    # bfloat16 keeps 8 bits of mantissa: agreement to a few hundredths, not to 1e-4
    assert (ours - ref).abs().max().item() < 0.1


def test_simulated_link_gives_identical_outputs(reference):
    folder, _ = reference
    with offload_rt.load(folder) as full:
        want = [r.token_ids for r in full.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
    with offload_rt.load(folder, cache_experts=3, link_gbps=16) as model:
        got = [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]
        stats = model.stats()
    assert got == want
    assert stats["host_resident"] == 16 and stats["link_seconds"] > 0
