"""Tier 1: the one-row CPU decode step with its glue compiled (`model/onerow.py`) against
transformers, for the families whose layers use each of its parts, and against the eager path.

The tiny models are below `onerow.MIN_HIDDEN`, so the tests lower it; their products stay
with torch's kernels (below `cpukernels.MIN_NUMEL`), except where a test lowers that too.
"""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.engine import BatchDecoder
from offload_rt.model import cpukernels, onequery, onerow, rowlayer
from tests.families import save_family
from tests.test_exactness import reference_greedy

PROMPT = [1, 17, 42, 99, 5, 63, 88, 12, 7, 101]
NEW_TOKENS = 10
GLUE = ("_enter", "_norm", "_heads", "_leave")


@pytest.fixture
def glue_on_tiny_models(monkeypatch):
    monkeypatch.setattr(onerow, "MIN_HIDDEN", 0)
    monkeypatch.delenv(cpukernels.ENV, raising=False)


def glue_compiled() -> set[str]:
    return {key[0] for key in cpukernels.COMPILED.kernels if key[0] in GLUE}


class count_calls:  # noqa: N801 (a wrapper, used as a function)
    """owner.name wrapped to count its calls (in `calls`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.calls, fn = 0, getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def decode_steps(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits after the prompt and after each of `tokens` but the last, step by step."""
    decoder = BatchDecoder(model.model, [prompt], len(prompt) + len(tokens))
    steps = [decoder.prefill()[0]] + [decoder.step([t], [True])[0] for t in tokens[:-1]]
    return torch.stack(steps)


# each part of the glue in some family: q/k norms per head and a dense first layer (qwen3_moe);
# q/k norms over the projection and clipping (olmoe); q/k/v and output biases, sinks,
# sliding-window rings, router biases, clamped experts (gpt_oss); sigmoid scores, groups, the
# correction bias, partial rotary, a shared expert (glm4_moe); plain Mixtral below
# (the C++ layers of `model/rowlayer.py` off: they would take olmoe's; tested below)
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "gpt_oss", "glm4_moe"])
def test_one_row_steps_equal_transformers(tmp_path, glue_on_tiny_models, monkeypatch, family):
    hf = save_family(family, tmp_path)
    want_tokens = reference_greedy(hf, PROMPT, NEW_TOKENS)
    monkeypatch.setattr(rowlayer, "plan", lambda *a, **k: None)
    native = count_calls(monkeypatch, onequery, "attend")
    heads = count_calls(monkeypatch, onerow, "heads")
    with offload_rt.load(tmp_path) as model:
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop=[]).token_ids
        steps = decode_steps(model, PROMPT, tokens)
    assert glue_compiled() >= {"_enter", "_heads", "_leave"}
    # attention in C++ (`model/onequery.py`) after the glue's `heads` (q/k norms in each of
    # these families, biases too in glm4_moe), but where sinks and sliding-window rings are
    # (gpt_oss): there torch's
    assert heads.calls > 0
    assert (native.calls > 0) == (family != "gpt_oss")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :]
    assert (steps - want).abs().max().item() <= 1e-4
    assert tokens == want_tokens


# q/k norms per head (qwen3_moe, here without its dense first layer: every layer must have a
# plan); over the projection, and clipping (olmoe)
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_the_cpp_layers_of_families_with_qk_norms_equal_transformers(
    tmp_path, glue_on_tiny_models, monkeypatch, family
):
    hf = save_family(family, tmp_path, **({"mlp_only_layers": []} if family == "qwen3_moe" else {}))
    want_tokens = reference_greedy(hf, PROMPT, NEW_TOKENS)
    layers = count_calls(monkeypatch, rowlayer, "attend")
    heads = count_calls(monkeypatch, onerow, "heads")
    with offload_rt.load(tmp_path) as model:
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop=[]).token_ids
        steps = decode_steps(model, PROMPT, tokens)
    n_layers = hf.config.num_hidden_layers
    assert layers.calls == 2 * n_layers * (NEW_TOKENS - 1) and heads.calls == 0
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :]
    assert (steps - want).abs().max().item() <= 1e-4
    assert tokens == want_tokens
    if family != "qwen3_moe":
        return
    # in bfloat16 (norms rounded as the glue rounds them): the step logits the one-row path's
    # within 2 ulps of the largest (measured 1.2%; float16 0.13%, olmoe 0.85% / 0.13%)
    plan = rowlayer.plan
    in_cpp, one_row = [], []
    for out in (in_cpp, one_row):
        with offload_rt.load(tmp_path, dtype=torch.bfloat16) as model:
            out.append(decode_steps(model, PROMPT, tokens).float())
        monkeypatch.setattr(rowlayer, "plan", lambda *a, **k: None)
    monkeypatch.setattr(rowlayer, "plan", plan)
    per_step = (in_cpp[0] - one_row[0]).abs().amax(-1) / one_row[0].abs().amax(-1)
    assert (per_step <= 2 * 2.0**-7).all()


def test_one_row_agrees_with_the_eager_step_and_is_only_taken_for_one_row(
    reference, glue_on_tiny_models, monkeypatch
):
    """Mixtral with every product compiled too: the step's logits, its layers in C++
    (`model/rowlayer.py`) or through the compiled glue, equal the eager step's to float
    rounding, batch 2 keeps the eager path, and an offloading backend (one expert's slot,
    prefetch) gives the same tokens."""
    folder, hf = reference
    monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    layers = count_calls(monkeypatch, rowlayer, "attend")
    with offload_rt.load(folder) as model:
        tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop=[]).token_ids
        in_cpp = decode_steps(model, PROMPT, tokens)
    assert layers.calls >= 2 * (NEW_TOKENS - 1)  # every layer of every step
    plan = rowlayer.plan
    monkeypatch.setattr(rowlayer, "plan", lambda *a, **k: None)  # the compiled glue instead
    native = count_calls(monkeypatch, onequery, "attend")
    heads = count_calls(monkeypatch, onerow, "heads")
    with offload_rt.load(folder) as model:
        compiled = decode_steps(model, PROMPT, tokens)
        assert glue_compiled() >= {"_enter", "_leave"}
        # every layer's attention in C++, its rotation too (no bias or norm comes first)
        assert native.calls >= 2 * (NEW_TOKENS - 1) and heads.calls == 0
        monkeypatch.setattr(rowlayer, "plan", plan)
        monkeypatch.setattr(onerow, "MIN_HIDDEN", 1 << 30)
        eager = decode_steps(model, PROMPT, tokens)
        before = len(cpukernels.COMPILED.kernels)
        pair = model.generate([PROMPT, PROMPT[:4]], max_new_tokens=4, stop=[])
    assert len(cpukernels.COMPILED.kernels) == before  # batch 2: nothing new compiled
    assert (compiled - eager).abs().max().item() <= 1e-5
    assert (in_cpp - eager).abs().max().item() <= 1e-5
    assert pair[0].token_ids == tokens[:4]
    monkeypatch.setattr(onerow, "MIN_HIDDEN", 0)
    with offload_rt.load(folder, cache_experts=1, prefetch=True) as model:
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop=[]).token_ids == tokens
        assert model.stats()["evictions"] > 0
