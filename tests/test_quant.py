"""Tier 1: group-wise int8 / int4 quantization against a straightforward per-group reference,
int4 packing, error bounds, and the packed device layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_rt.config import ConfigError, QuantConfig
from offload_rt.experts.formats import expert_nbytes
from offload_rt.experts.quant import (
    ExpertCodec,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from offload_rt.models import parse_config

ROWS, COLS = 24, 128


def reference_quantize(w: np.ndarray, bits: int, group: int):
    """The format written out group by group in numpy: offset = the group's minimum rounded
    down to float16, scale = (max - offset) / (2^bits - 1) rounded up to float16, codes =
    round((w - offset) / scale) (half to even), every step in float32."""
    levels = np.float32(2**bits - 1)
    rows, cols = w.shape
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, cols // group), np.float16)
    offsets = np.zeros((rows, cols // group), np.float16)
    for r in range(rows):
        for g in range(cols // group):
            x = w[r, g * group : (g + 1) * group]
            lo = np.float16(x.min())
            if np.float32(lo) > x.min():
                lo = np.nextafter(lo, np.float16(-np.inf))
            s = (np.float32(x.max()) - np.float32(lo)) / levels
            s16 = np.float16(s)
            if np.float32(s16) < s:
                s16 = np.nextafter(s16, np.float16(np.inf))
            step = np.float32(s16) if s16 > 0 else np.float32(1)
            q = np.clip(np.round((x - np.float32(lo)) / step), 0, levels)
            codes[r, g * group : (g + 1) * group] = q.astype(np.uint8)
            scales[r, g], offsets[r, g] = s16, lo
    return codes, scales, offsets


def reference_pack(codes: np.ndarray) -> np.ndarray:
    """Byte j of a row: column j in the low nibble, column j + cols/2 in the high nibble."""
    half = codes.shape[1] // 2
    out = np.zeros((codes.shape[0], half), np.uint8)
    for r in range(codes.shape[0]):
        for j in range(half):
            out[r, j] = int(codes[r, j]) + 16 * int(codes[r, j + half])
    return out


def random_weight(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g)
    if kind == "lopsided":  # groups whose minimum and maximum differ a lot in size
        return torch.empty(ROWS, COLS).exponential_(1.0, generator=g) - 0.2
    if kind == "tiny":  # scales in float16's subnormal range
        return w * 1e-6
    if kind == "large":
        return w * 300
    if kind == "constant-groups":
        w[:, :32] = 0.1  # not a float16 value
        w[3, 32:64] = -2.0
        return w
    return w * 0.02


KINDS = ["normal", "lopsided", "tiny", "large", "constant-groups"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits, group", [(8, 32), (8, 128), (4, 16), (4, 64)])
def test_quantize_equals_the_reference(kind, bits, group):
    w = random_weight(kind)
    q = quantize(w, QuantConfig(bits, group))
    codes, scales, offsets = reference_quantize(w.numpy(), bits, group)
    assert q.scales.dtype == q.offsets.dtype == torch.float16 and q.qweight.dtype == torch.uint8
    np.testing.assert_array_equal(q.scales.numpy(), scales)
    np.testing.assert_array_equal(q.offsets.numpy(), offsets)
    packed = reference_pack(codes) if bits == 4 else codes
    assert q.qweight.shape == packed.shape
    np.testing.assert_array_equal(q.qweight.numpy(), packed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits, group", [(8, 32), (4, 16), (4, 128)])
def test_round_trip_error_is_at_most_half_a_step(kind, bits, group):
    w = random_weight(kind, seed=1)
    q = quantize(w, QuantConfig(bits, group))
    back = dequantize(q, QuantConfig(bits, group))
    # the reference's dequantization, in float64
    codes = unpack_int4(q.qweight) if bits == 4 else q.qweight
    s = q.scales.double().repeat_interleave(group, dim=1)
    m = q.offsets.double().repeat_interleave(group, dim=1)
    exact = m + codes.double() * s
    assert (back.double() - exact).abs().max() <= 1e-6 * exact.abs().max()
    err = (w.double() - exact).abs()
    # half a step, and float16's rounding of the offset where a group is constant
    assert (err <= s / 2 * (1 + 1e-5) + m.abs() * 2**-11).all()
    spread = w.reshape(ROWS, -1, group).amax(-1) > w.reshape(ROWS, -1, group).amin(-1)
    grouped_codes = codes.reshape(ROWS, -1, group)
    # the grid spans each group with no code to spare: minimum code 0, maximum the top code
    # (but where scales and offsets are float16 subnormals, whose rounding exceeds a step)
    if kind != "tiny":
        assert (grouped_codes.amin(-1)[spread] == 0).all()
        assert (grouped_codes.amax(-1)[spread] == 2**bits - 1).all()


def test_int4_error_is_sixteen_times_int8s():
    w = random_weight("normal", seed=2)
    err = {
        bits: (dequantize(quantize(w, QuantConfig(bits, 32)), QuantConfig(bits, 32)) - w)
        .abs()
        .mean()
        .item()
        for bits in (8, 4)
    }
    assert err[4] / err[8] == pytest.approx(255 / 15, rel=0.1)


def test_int4_packing():
    codes = torch.tensor(
        [[0, 1, 2, 3, 15, 14, 13, 12], [5, 5, 5, 5, 0, 0, 0, 15]], dtype=torch.uint8
    )
    packed = pack_int4(codes)
    assert packed.tolist() == [[0xF0, 0xE1, 0xD2, 0xC3], [0x05, 0x05, 0x05, 0xF5]]
    assert torch.equal(unpack_int4(packed), codes)
    gen = torch.Generator().manual_seed(7)
    many = torch.randint(0, 16, (7, 64), dtype=torch.uint8, generator=gen)
    np.testing.assert_array_equal(pack_int4(many).numpy(), reference_pack(many.numpy()))
    assert torch.equal(unpack_int4(pack_int4(many)), many)


def test_quantize_refuses_what_it_cannot_store():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="layer 3 expert 1 w2: group size 48 does not divide"):
        quantize(w, QuantConfig(8, 48), name="layer 3 expert 1 w2")
    w[1, 5] = float("nan")
    with pytest.raises(ValueError, match="w1: holds inf or nan"):
        quantize(w, QuantConfig(8, 32), name="w1")
    with pytest.raises(ValueError, match="beyond float16's range"):
        quantize(torch.full((2, 32), -1e5), QuantConfig(4, 32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3, "group_size": 64}, "bits must be one of"),
        ({"bits": 4, "group_size": 63}, "even for 4 bits"),
        ({"bits": 8, "group_size": 0}, "positive integer"),
    ],
)
def test_quant_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    "bits, dtype", [(8, torch.float32), (4, torch.float32), (4, torch.bfloat16)]
)
def test_codec_packs_and_dequantizes_an_expert(bits, dtype):
    d, f, quant = 32, 48, QuantConfig(bits, 16)
    g = torch.Generator().manual_seed(3)
    w = {"gate": torch.randn(f, d, generator=g), "up": torch.randn(f, d, generator=g)}
    w["down"] = torch.randn(d, f, generator=g)
    parts = {}
    for proj, weight in w.items():
        q = quantize(weight, quant)
        parts.update({f"{proj}.{p}": getattr(q, p) for p in ("qweight", "scales", "offsets")})
    codec = ExpertCodec(d, f, quant, torch.device("cpu"), dtype)
    buf = torch.full((codec.nbytes,), 0xAA, dtype=torch.uint8)
    codec.pack(parts, buf)
    ffn = codec.dequantize(codec.views(buf))
    w13, w2 = ffn.w13, ffn.w2

    def deq(proj: str) -> torch.Tensor:
        q = quantize(w[proj], quant)
        return dequantize(q, quant, dtype)

    assert w13.dtype == dtype and w13.shape == (2 * f, d) and w2.shape == (d, f)
    assert torch.equal(w13, torch.cat([deq("gate"), deq("up")])) and torch.equal(w2, deq("down"))
    scratch = w13.data_ptr()
    assert codec.dequantize(codec.views(buf)).w13.data_ptr() == scratch  # reused, not new
    # codes, then two float16 groups per (row, group) for scales and offsets
    per_weight = 3 * f * d * bits // 8 + 2 * 2 * 3 * f * d // 16
    assert codec.nbytes == per_weight


def test_expert_bytes_against_16_and_32_bit_weights():
    # Mixtral 8x7B's expert: 3 x 14336 x 4096 weights
    base = dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
    )
    plain = parse_config(base)
    n = plain.expert_numel
    for bits, halves in ((8, 0.5 + 1 / 32), (4, 0.25 + 1 / 32)):
        q = parse_config({**base, "quantization_config": QuantConfig(bits, 64).to_dict()})
        assert expert_nbytes(q, torch.bfloat16) / expert_nbytes(plain, torch.bfloat16) == halves
        assert expert_nbytes(q, torch.float32) == n * bits // 8 + n // 64 * 4
    with pytest.raises(ConfigError, match="group_size 96 does not divide hidden_size 4096"):
        parse_config({**base, "quantization_config": QuantConfig(8, 96).to_dict()})
    with pytest.raises(ConfigError, match="quant_method 'gptq'"):
        parse_config({**base, "quantization_config": {"quant_method": "gptq"}})
