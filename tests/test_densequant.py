"""Tier 2: dense weights quantized at load (`load(..., dense_quant=...)`) against transformers
holding exactly the weights those codes stand for, with torch's kernels and with the compiled
CPU kernels reading the codes."""

from __future__ import annotations

import pytest
import torch

import offload_rt
from offload_rt.config import QuantConfig
from offload_rt.engine.densequant import QuantizedDense, dense_bytes
from offload_rt.experts.quant import dequantize, quantize
from offload_rt.model import cpukernels
from tests.families import save_family
from tests.test_exactness import PROMPTS, reference_greedy

GROUP = 64
# the dense matrices the runtime quantizes, by transformers' names (q/k/v: one stacked matrix
# in the runtime, quantized row by row, so each on its own gives the same codes)
DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj")
DENSE += ("shared_expert.up_proj", "shared_expert.down_proj", "lm_head")


def dequantized_reference(hf: torch.nn.Module, bits: int, head_bits: int | None = None) -> int:
    """Replace, in place, each dense weight the runtime quantizes by what its codes stand for
    (lm_head's in `head_bits` where given); returns how many were replaced."""
    replaced = 0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith(".weight") or not any(d in name for d in DENSE):
                continue
            if "shared_expert_gate" in name or p.shape[1] % GROUP:
                continue
            b = head_bits if head_bits is not None and name.startswith("lm_head") else bits
            if b == 4 and (p.shape[1] // GROUP) % 2:
                continue
            quant = QuantConfig(b, GROUP)
            p.copy_(dequantize(quantize(p, quant, name), quant))
            replaced += 1
    return replaced


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers model) with widths the group divides."""
    out = {}
    for family in ("mixtral", "qwen2_moe"):
        folder = tmp_path_factory.mktemp(f"dense-{family}")
        out[family] = folder, save_family(family, folder, hidden_size=128)
    return out


# the last: lm_head in int8 beside int4 attention, as llama.cpp's q4_0 keeps it in 6 bits
@pytest.mark.parametrize(
    "family, bits, kernels, head",
    [
        ("mixtral", 8, "eager", None),
        ("mixtral", 4, "compiled", None),
        ("qwen2_moe", 8, "compiled", None),
        ("mixtral", 4, "compiled", 8),
    ],
)
def test_dense_quant_equals_transformers_on_the_dequantized_weights(
    checkpoints, family, bits, kernels, head, monkeypatch
):
    if kernels == "compiled":  # every one-row product through the kernels, from the codes
        monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    folder, hf = checkpoints[family]
    with offload_rt.load(folder) as model:
        float_bytes = dense_bytes(model.model.weights)
    lm_head_quant = None if head is None else f"int{head}"
    with offload_rt.load(folder, dense_quant=f"int{bits}", lm_head_quant=lm_head_quant) as model:
        weights = model.model.weights
        assert isinstance(weights.lm_head, QuantizedDense)
        assert weights.lm_head.quant.bits == (head or bits)
        assert isinstance(weights.layers[0].attn.wqkv, QuantizedDense)
        assert dense_bytes(weights) < 0.7 * float_bytes
        got = model.logits(PROMPTS[0])
        tokens = model.generate(PROMPTS[1], max_new_tokens=16).token_ids
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    assert dequantized_reference(ref, bits, head) >= 4
    with torch.no_grad():
        want = ref(torch.tensor([PROMPTS[0]])).logits[0]
    assert (got - want).abs().max().item() <= 1e-4
    assert tokens == reference_greedy(ref, PROMPTS[1], 16)
    with torch.no_grad():  # and the quantization did change something
        assert (hf(torch.tensor([PROMPTS[0]])).logits[0] - want).abs().max().item() > 1e-3


def test_dense_quant_names_what_it_takes(checkpoints):
    with pytest.raises(ValueError, match="dense_quant must be one of"):
        offload_rt.load(checkpoints["mixtral"][0], dense_quant="int3")
    with pytest.raises(ValueError, match="lm_head_quant needs dense_quant"):
        offload_rt.load(checkpoints["mixtral"][0], lm_head_quant="int8")
    with pytest.raises(ValueError, match="lm_head_quant must be one of"):
        offload_rt.load(checkpoints["mixtral"][0], dense_quant="int4", lm_head_quant="q6")
