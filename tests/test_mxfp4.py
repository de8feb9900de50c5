"""Tier 1: MXFP4 (GPT-OSS's expert format): dequantization bit-identical to transformers'
reader, quantization to the nearest e2m1 value at the spec's or the better exponent, error
bounds, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from offload_rt.experts import mxfp4
from offload_rt.experts.mxfp4 import (
    FP4_MAGNITUDES,
    FP4_VALUES,
    dequantize_mxfp4,
    dequantize_mxfp4_new,
    mxfp4_nbytes,
    quantize_mxfp4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRID = torch.tensor(FP4_MAGNITUDES, dtype=torch.float64)


def random_parts(experts: int, rows: int, groups: int, seed: int):
    """Random codes and exponent bytes in GPT-OSS's range, with the extremes 0 and 254 mixed in:
    blocks (E, R, G, 16), scales (E, R, G)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 136, (experts, rows, groups), generator=g, dtype=torch.uint8)
    extreme = torch.rand(scales.shape, generator=g) < 0.05
    pick = torch.randint(0, 2, scales.shape, generator=g, dtype=torch.uint8) * 254
    return blocks, torch.where(extreme, pick, scales)


def reference(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' dequantization, (E, C, R), brought back to this module's (E, R, C)."""
    return convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_equals_transformers(dtype):
    blocks, scales = random_parts(3, 40, 6, seed=1)
    out = torch.full((3, 40, 6 * 32), float("nan"), dtype=dtype)
    assert dequantize_mxfp4(blocks, scales, out) is out
    assert torch.equal(out, reference(blocks, scales, dtype))
    assert torch.equal(dequantize_mxfp4_new(blocks[1], scales[1], dtype), out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_in_steps_with_a_remainder(monkeypatch, dtype):
    monkeypatch.setitem(mxfp4._CHUNK, "cpu", 16 * 7)  # 7 blocks a step; 23 * 3 = 69 blocks
    blocks, scales = random_parts(1, 23, 3, seed=2)
    out = dequantize_mxfp4_new(blocks[0], scales[0], dtype)
    assert torch.equal(out, reference(blocks, scales, dtype)[0])


def test_dequantize_rejects_mismatched_parts():
    blocks, scales = random_parts(1, 4, 2, seed=3)
    with pytest.raises(ValueError, match="out"):
        dequantize_mxfp4(blocks[0], scales[0], torch.empty(4, 32))
    with pytest.raises(ValueError, match="blocks"):
        dequantize_mxfp4(blocks[0, :, :1], scales[0], torch.empty(4, 64))
    with pytest.raises(ValueError, match="out"):
        dequantize_mxfp4(blocks[0], scales[0], torch.empty(4, 64, dtype=torch.float64))


def spec_exponents(w: torch.Tensor) -> torch.Tensor:
    """(R, C) -> the OCP spec's exponent per block of 32, floor(log2 max|w|) - 2, (R, C / 32)."""
    amax = w.double().abs().reshape(w.shape[0], -1, 32).amax(-1)
    return torch.floor(torch.log2(amax)).long() - 2


def block_exponents(scales: torch.Tensor) -> torch.Tensor:
    """(R, G) exponent bytes -> 2^exponent per value, (R, 32 G) float64."""
    return torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=1)


def nearest_error(w: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """Each block's squared error when its values go to the nearest grid value at 2^exps (R, G):
    brute force over the 8 magnitudes, in float64."""
    step = torch.pow(2.0, exps.double()).repeat_interleave(32, dim=1)
    a = (w.double().abs() / step)[..., None]
    err = ((a - GRID).abs().amin(-1) * step) ** 2
    return err.reshape(w.shape[0], -1, 32).sum(-1)


def normal_weight(rows: int, cols: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("min_error", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_half_a_grid_step(min_error, dtype):
    w = normal_weight(64, 512, seed=4, dtype=dtype)
    blocks, scales = quantize_mxfp4(w, min_error=min_error)
    assert blocks.shape == (64, 16, 16) and scales.shape == (64, 16)
    assert blocks.dtype == scales.dtype == torch.uint8
    chosen = scales.long() - 127
    spec = spec_exponents(w)
    allowed = torch.tensor([0, 1] if min_error else [0])
    assert torch.isin(chosen - spec, allowed).all()
    # value a = |w| / 2^X of a block: the grid's spacing is 0.5 below 2, 1 up to 4 and 2 up to
    # 6, so nearest rounding errs by at most half of it; beyond 6 the value saturates to 6
    step = block_exponents(scales)
    a = w.double().abs() / step
    bound = torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0))
    bound = torch.where(a > 6, a - 6, bound) * step
    w_hat = dequantize_mxfp4_new(blocks, scales, torch.float32).double()
    assert ((w.double() - w_hat).abs() <= bound).all()
    assert (torch.sign(w_hat) * torch.sign(w.double()) >= 0).all()
    if min_error:  # the chosen exponent's error is the lower of the two candidates'
        err = {e: nearest_error(w, spec + e) for e in (0, 1)}
        lower = torch.minimum(err[0], err[1])
        assert torch.allclose(nearest_error(w, chosen), lower, rtol=1e-6, atol=0)


def test_values_on_the_grid_come_back_exactly():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (32, 256), generator=g)
    exps = torch.randint(-20, 21, (32, 8), generator=g).double().repeat_interleave(32, dim=1)
    w = (torch.tensor(FP4_VALUES, dtype=torch.float64)[codes] * torch.pow(2.0, exps)).float()
    w[:, 64:96] = 0.0  # an all-zero block
    w[3, 5] = 0.0
    blocks, scales = quantize_mxfp4(w)
    assert torch.equal(dequantize_mxfp4_new(blocks, scales, torch.float32), w)
    assert (scales[:, 2] == 0).all() and (blocks[:, 2] == 0).all()


def test_zeros_stay_zeros():
    blocks, scales = quantize_mxfp4(torch.zeros(8, 64, dtype=torch.bfloat16))
    assert not blocks.any() and not scales.any()
    assert not dequantize_mxfp4_new(blocks, scales, torch.bfloat16).any()


def test_ties_round_to_the_even_code():
    # a block whose largest value 6 fixes the exponent at 0; the others sit on midpoints
    row = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.0] * 22)
    blocks, scales = quantize_mxfp4(row[None], min_error=False)
    assert scales.item() == 127
    w_hat = dequantize_mxfp4_new(blocks, scales, torch.float32)[0, :10]
    assert w_hat.tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]


def relative_rms(w: torch.Tensor, min_error: bool) -> float:
    blocks, scales = quantize_mxfp4(w, min_error=min_error)
    w_hat = dequantize_mxfp4_new(blocks, scales, torch.float32)
    return ((w - w_hat).square().mean() / w.square().mean()).sqrt().item()


def test_relative_rms_error_and_the_better_exponent():
    g = torch.Generator().manual_seed(6)
    weights = {
        "normal": torch.randn(256, 2048, generator=g),
        "uniform": torch.rand(256, 2048, generator=g) * 2 - 1,
    }
    errors = {(k, m): relative_rms(w, m) for k, w in weights.items() for m in (False, True)}
    print({f"{k} {'min-error' if m else 'spec'}": round(e, 4) for (k, m), e in errors.items()})
    # measured: normal 0.1149 (spec) -> 0.1116, uniform 0.1440 -> 0.0987
    assert errors[("normal", True)] < 0.113 < 0.114 < errors[("normal", False)] < 0.117
    assert errors[("uniform", True)] < 0.1 < 0.14 < errors[("uniform", False)] < 0.15


@pytest.mark.parametrize(
    "w, what",
    [
        (torch.zeros(4, 48), "not a multiple of 32"),
        (torch.zeros(64), "2-D"),
        (torch.zeros(4, 64, dtype=torch.int32), "float"),
        (torch.zeros(4, 64).index_fill_(1, torch.tensor([7]), float("nan")), "inf or nan"),
        (torch.zeros(4, 64).index_fill_(1, torch.tensor([9]), float("-inf")), "inf or nan"),
    ],
)
def test_bad_input_names_the_tensor(w, what):
    with pytest.raises(ValueError, match=f"layers.3.mlp.experts.gate_up_proj.*{what}"):
        quantize_mxfp4(w, name="layers.3.mlp.experts.gate_up_proj")


def test_nbytes_counts_blocks_and_scales():
    blocks, scales = quantize_mxfp4(normal_weight(96, 320, seed=7))
    assert mxfp4_nbytes(96, 320) == blocks.numel() + scales.numel() == 96 * 320 // 2 + 96 * 10
    assert mxfp4_nbytes(5760, 2880) == 5760 * 2880 * 17 // 32
    with pytest.raises(ValueError, match="100 columns"):
        mxfp4_nbytes(4, 100)
