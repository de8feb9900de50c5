"""Tier 1: a one-sequence CPU decode step from the token id (`DecoderModel.step_token`, the
whole-step C++ call with no torch operation around it) against the same step through
`step_logits` (embedding, then the same call): the same logits bit for bit, the same greedy
token, the same counts; and the steps it leaves to `step_logits`."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.engine import BatchDecoder
from offload_rt.model import cpukernels, onerow, rowlayer
from offload_rt.model.decoder import MoEDecoder
from tests.conftest import save_reference

PROMPT = [1, 17, 42, 99, 5]
pytestmark = pytest.mark.skipif(not rowlayer.available(), reason="the C++ step does not build")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mixtral whose widths the row loops read, with a sliding window of 8 positions."""
    folder = tmp_path_factory.mktemp("steptoken")
    save_reference(
        folder, hidden_size=128, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    return folder


@pytest.fixture(autouse=True)
def glue_on_tiny_models(monkeypatch):
    """The one-row path (and so the C++ step) for the tiny model too."""
    monkeypatch.setattr(onerow, "MIN_HIDDEN", 0)
    monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)


def decode(model, steps: int) -> tuple[torch.Tensor, list[int], list[bool]]:
    """A greedy decode of PROMPT with every expert resident: each step's logits, the greedy
    tokens the decoder was handed, and whether each step was served by `step_token`."""
    model.warm()
    served = []
    step_token = type(model.model).step_token

    def spy(self, *args):
        got = step_token(self, *args)
        served.append(got is not None)
        return got

    decoder = BatchDecoder(model.model, [PROMPT], len(PROMPT) + steps + 1)
    out, greedy = [decoder.prefill()[0]], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model.model), "step_token", spy)
        for _ in range(steps):
            logits = decoder.step([int(out[-1].argmax())], [True])
            greedy.append((decoder.greedy(logits) or [None])[0])
            out.append(logits[0])
    return torch.stack(out), greedy, served


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_step_from_the_token_id_equals_the_step_from_its_embedding(checkpoint, dtype):
    """Up to the window (position 7) `step_token` serves every step; past it (the mask hides
    keys) `step_logits` does. The logits equal those of `step_logits` for every step, bit for
    bit, and so do the greedy tokens and the backend's counts."""
    with offload_rt.load(checkpoint, dtype=dtype) as model:
        fast, greedy, served = decode(model, 6)
        counts = model.stats()
    assert served == [True, True, True, False, False, False]  # positions 5, 6, 7, then 8..
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoEDecoder, "step_token", lambda self, *a: None)
        with offload_rt.load(checkpoint, dtype=dtype) as model:
            slow, greedy_slow, _ = decode(model, 6)
            counts_slow = model.stats()
    assert torch.equal(fast, slow)
    assert greedy[:3] == [int(row.argmax()) for row in fast[1:4]]
    assert greedy == greedy_slow
    names = ("hits", "misses", "evictions", "resident")
    assert [counts[n] for n in names] == [counts_slow[n] for n in names]


def test_it_leaves_to_step_logits_what_it_does_not_serve(checkpoint):
    """Not every expert resident for good (a capped cache), or a cache of two rows: None, and
    nothing done (the cache's positions untouched)."""
    with offload_rt.load(checkpoint, dtype=torch.float32, cache_experts=6) as model:
        decoder = BatchDecoder(model.model, [PROMPT], 16)
        decoder.prefill()
        before = [k.clone() for k in decoder.cache.keys]
        assert model.model.step_token(3, len(PROMPT), decoder.cache) is None
        assert all(torch.equal(a, b) for a, b in zip(before, decoder.cache.keys))
    with offload_rt.load(checkpoint, dtype=torch.float32) as model:
        model.warm()
        two = BatchDecoder(model.model, [PROMPT, PROMPT[:3]], 16)
        two.prefill()
        assert model.model.step_token(3, len(PROMPT), two.cache) is None


def test_a_token_outside_the_vocabulary_is_refused_and_loses_nothing(checkpoint):
    """An id past the vocabulary: an IndexError that names it, the decoder's length as it was,
    and the next step's logits those of a decoder that never saw it."""
    with offload_rt.load(checkpoint, dtype=torch.float32) as model:
        model.warm()
        vocab = model.config.vocab_size
        decoder = BatchDecoder(model.model, [PROMPT], 16)
        decoder.prefill()
        with pytest.raises(IndexError, match=f"token {vocab} is not in the vocabulary"):
            decoder.step([vocab], [True])
        assert decoder.lengths == [len(PROMPT)]
        after = decoder.step([7], [True])
        clean = BatchDecoder(model.model, [PROMPT], 16)
        clean.prefill()
        assert torch.equal(after, clean.step([7], [True]))
