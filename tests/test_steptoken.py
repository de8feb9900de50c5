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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
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


@pytest.mark.parametrize("dtype", [torch.float32])  # bfloat16: the test below
def test_greedy_steps_in_one_call_equal_the_steps_one_by_one(checkpoint, dtype):
    """`greedy_steps`: the tokens, the cache's keys and values and the counts of `step_token`
    called once a step with each argmax; a run ends after a stop id, and where the sliding
    window begins (position 8: three steps from position 5)."""
    with offload_rt.load(checkpoint, dtype=dtype) as model:
        model.warm()
        caches, found = [], []
        for by_run in (True, False):
            before = model.stats()["hits"]
            decoder = BatchDecoder(model.model, [PROMPT], 16)
            decoder.prefill()
            if by_run:
                tokens = decoder.greedy_steps(9, 6, torch.tensor([], dtype=torch.long))
            else:
                tokens, token = [], 9
                for _ in range(3):
                    token = decoder.step([token], [True]).argmax().item()
                    tokens.append(token)
            found.append((tokens, model.stats()["hits"] - before, list(decoder.lengths)))
            caches.append(decoder.cache)
        assert found[0] == found[1] and len(found[0][0]) == 3 and found[0][2] == [8]
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            assert torch.equal(a, b)
        decoder = BatchDecoder(model.model, [PROMPT], 16)
        decoder.prefill()
        stop = torch.tensor([found[0][0][1], 30000], dtype=torch.long)
        assert decoder.greedy_steps(9, 3, stop) == found[0][0][:2]  # ends after the stop id
        assert decoder.lengths == [len(PROMPT) + 2]
        last = found[0][0][1]
        assert decoder.greedy_steps(last, 3, stop[:0]) == [found[0][0][2]]  # to the window
        assert decoder.greedy_steps(found[0][0][2], 3, stop[:0]) is None  # past it: nothing done
        assert decoder.lengths == [len(PROMPT) + 3]


@pytest.mark.parametrize("stop", [False, True])
def test_generate_by_greedy_runs_gives_the_tokens_of_steps(checkpoint, stop):
    """A lone greedy request decodes by runs of steps (`generate`): the same tokens, finish
    reason and counts as the step-by-step loop, ending at a stop token or the budget."""
    with offload_rt.load(checkpoint, dtype=torch.bfloat16) as model:
        model.warm()
        want = model.generate(PROMPT, max_new_tokens=14)
        stops = [want.token_ids[2]] if stop else []
        runs = []
        steps = type(model.model).greedy_steps

        def spy(self, *args):
            got = steps(self, *args)
            runs.append(None if got is None else len(got))
            return got

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(model.model), "greedy_steps", spy)
            before = model.stats()["hits"]
            got = model.generate(PROMPT, max_new_tokens=14, stop=stops)
            hits = model.stats()["hits"] - before
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MoEDecoder, "greedy_steps", lambda self, *a: None)
            before = model.stats()["hits"]
            step_by_step = model.generate(PROMPT, max_new_tokens=14, stop=stops)
            assert hits == model.stats()["hits"] - before
    assert got.token_ids == step_by_step.token_ids
    assert got.finish_reason == step_by_step.finish_reason == ("stop" if stop else "length")
    assert len(got.token_ids) == (3 if stop else 14)
    assert runs[:2] == ([2] if stop else [2, 1])  # from position 5 up to the window (8)
    assert runs[2:] == [None] * (len(runs) - 2)  # past it, step by step


def test_the_first_row_of_a_continuous_batch_steps_by_its_token_id(checkpoint):
    """A continuous batch (the scheduler's) whose only running row is the first: its steps go
    through `step_token` on a view of that row, with the logits of a one-row decoder."""
    with offload_rt.load(checkpoint, dtype=torch.float32) as model:
        model.warm()
        solo = BatchDecoder(model.model, [PROMPT], 16)
        want = [solo.prefill()[0]]
        batch = BatchDecoder.empty(model.model, 3, 16)
        got = [batch.prefill_rows([0], [PROMPT])[0][0]]
        served = []
        step_token = MoEDecoder.step_token

        def spy(*args):
            ends = step_token(*args)
            served.append(ends is not None)
            return ends

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MoEDecoder, "step_token", spy)
            for token in (3, 44):
                want.append(solo.step([token], [True])[0])
                got.append(batch.step([token], [True])[0])
        assert served == [True] * 4 and batch.lengths == [len(PROMPT) + 2, 0, 0]
        assert torch.equal(torch.stack(got), torch.stack(want))
