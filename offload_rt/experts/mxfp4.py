"""MXFP4 expert weights as OpenAI released GPT-OSS's experts: quantization and dequantization.

For one weight W (R, C), C a multiple of 32, blocks of 32 consecutive columns of a row:

    W[r, 32g + j] = FP4_VALUES[code(r, 32g + j)] · 2^(scales[r, g] − 127)
    blocks: (R, C / 32, 16) uint8; byte k of a block holds column 2k in its low nibble and
            column 2k + 1 in its high nibble (e2m1 codes: sign, 2 exponent bits, 1 mantissa bit)
    scales: (R, C / 32) uint8, an e8m0 exponent with bias 127 (255, NaN in the OCP spec, unused)

This is the layout `transformers.integrations.mxfp4.convert_moe_packed_tensors` reads, without
its expert dimension and its final transpose; `dequantize_mxfp4` gives bit-identical values.
"""

from __future__ import annotations

import functools

import torch

from offload_rt.dtypes import DTYPES

GROUP = 32  # columns sharing one exponent
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 codes 0 .. 7
FP4_VALUES = FP4_MAGNITUDES + tuple(-v for v in FP4_MAGNITUDES)  # code 8 + c is -(code c)
# midpoints between neighbouring magnitudes 0 .. 6 of the e2m1 grid: the rounding thresholds
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_EMAX = 2  # exponent of e2m1's largest magnitude, 6 = 1.5 · 2^2
_E8M0_MIN, _E8M0_MAX = -127, 127
OUT_DTYPES = tuple(DTYPES.values())  # the compute dtypes
# index entries (int32) a dequantization step handles at once: on the CPU 4 MiB, which stays in
# cache between the two passes over it; a GPU prefers fewer, larger launches
_CHUNK = {"cpu": 1 << 20}
_CHUNK_DEVICE = 1 << 22


def mxfp4_nbytes(rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) weight in MXFP4: half a byte a value, one byte per 32 values."""
    if cols % GROUP:
        raise ValueError(f"mxfp4: {cols} columns is not a multiple of {GROUP}")
    return rows * cols // 2 + rows * cols // GROUP


def quantize_mxfp4(
    w: torch.Tensor, name: str = "weight", *, min_error: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) of any float dtype -> blocks (R, C / 32, 16) uint8, scales (R, C / 32) uint8.

    The OCP Microscaling spec sets a block's exponent to X = floor(log2 max|w|) − 2, so that its
    largest value scales into [4, 8): values above 6 · 2^X saturate to ±6 (up to 25 % of the
    largest value lost). With `min_error` (the default) each block takes whichever of X and X + 1
    gives the lower squared error (X on a tie), which is never worse per block and measured
    (tests/test_mxfp4.py) lowers the relative RMS error of normal(0, 1) weights from 0.115 to
    0.112 and of uniform ones from 0.144 to 0.099; `min_error=False` is the spec's choice.
    Exponents are clamped to e8m0's [−127, 127]; an all-zero block gets −127 (byte 0) and
    codes 0. Values round to the nearest e2m1 value, ties to the even code (as IEEE and the OCP
    spec do), and saturate at ±6; a negative value that rounds to zero keeps its sign (code 8).
    `name` labels errors (the checkpoint tensor being quantized)."""
    x = _checked(w, name).float().contiguous()  # a transposed view: rows of 32 in a row
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: holds inf or nan (in float32); it cannot be quantized")
    rows, cols = x.shape
    x = x.reshape(rows, cols // GROUP, GROUP)  # (R, G, 32)
    amax = x.abs().amax(dim=-1)  # (R, G)
    # frexp's exponent e has amax = m · 2^e, 0.5 <= m < 1: floor(log2 amax) = e − 1, exactly
    exp = torch.frexp(amax).exponent - 1 - _EMAX
    exp = torch.where(amax > 0, exp, _E8M0_MIN).clamp_(_E8M0_MIN, _E8M0_MAX)
    codes, err = _round_block(x, exp)
    if min_error:
        up = (exp + 1).clamp_(max=_E8M0_MAX)
        codes_up, err_up = _round_block(x, up)
        better = err_up * 4 < err  # (R, G); each error is in units of its own 4^exp
        exp = torch.where(better, up, exp)
        codes = torch.where(better[..., None], codes_up, codes)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (R, G, 16)
    return packed, (exp + 127).to(torch.uint8)


def _checked(w: torch.Tensor, name: str) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"{name}: mxfp4 quantizes 2-D weights, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{name}: mxfp4 quantizes float weights, got {w.dtype}")
    if w.shape[1] % GROUP:
        raise ValueError(f"{name}: its {w.shape[1]} columns are not a multiple of {GROUP}")
    return w


def _round_block(x: torch.Tensor, exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, G, 32) float32 at block exponents exp (R, G) -> e2m1 codes (R, G, 32) uint8 and
    each block's squared error (R, G) in units of 4^exp."""
    scaled = torch.ldexp(x, -exp[..., None])  # exact: a power of two, int exponent
    mag = scaled.abs()
    mids = torch.tensor(_MIDPOINTS, device=x.device)
    # a value on a midpoint goes to the lower code ...
    code = torch.bucketize(mag, mids, out_int32=True)
    tie = (code < len(_MIDPOINTS)) & (mag == mids[code.clamp(max=len(_MIDPOINTS) - 1)])
    code += tie & (code % 2 == 1)  # ... unless that code is odd: ties to even
    grid = torch.tensor(FP4_MAGNITUDES, device=x.device)[code]
    err = (grid - mag).square_().sum(dim=-1)
    code |= torch.signbit(scaled).int() << 3
    return code.to(torch.uint8), err


@functools.cache
def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(65536,) both values of a byte b at exponent byte e, at index e · 256 + b, as one int32
    (2-byte dtypes) or int64 (float32): each the float32 product FP4_VALUES[code] · 2^(e − 127),
    exact or ±inf, rounded once to dtype, as transformers' `ldexp` computes it."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    b = torch.arange(256)
    pairs = torch.stack([lut[b & 15], lut[b >> 4]], dim=-1)  # (256, 2): low nibble first
    powers = torch.pow(2.0, torch.arange(256, dtype=torch.int32) - 127)  # float32
    values = (pairs[None] * powers[:, None, None]).to(dtype)  # (256 e, 256 b, 2)
    pair = torch.int32 if dtype.itemsize == 2 else torch.int64
    return values.reshape(-1, 2).view(pair).reshape(-1).to(device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill out (R, C) (float32, bfloat16 or float16, contiguous) with the weight that blocks
    (R, C / 32, 16) and scales (R, C / 32) stand for, and return it. Leading dimensions beyond
    R (experts) are allowed if all three share them.

    Each byte with its block's exponent indexes a 65536-entry table of value pairs (`_table`), so
    a step is one integer add and one gather; the only temporaries are an int32 index and shifted
    exponents of at most 4 MiB (16 MiB on a GPU), reused across steps."""
    _check_parts(blocks, scales, out)
    table = _table(out.dtype, out.device)
    flat_blocks = blocks.reshape(-1, GROUP // 2)  # (N, 16), N = number of blocks
    flat_scales = scales.reshape(-1, 1)  # (N, 1)
    flat_out = out.view(table.dtype).view(-1, GROUP // 2)  # (N, 16) value pairs
    n = flat_blocks.shape[0]
    step = max(1, _CHUNK.get(out.device.type, _CHUNK_DEVICE) // (GROUP // 2))
    index = torch.empty(min(step, n), GROUP // 2, dtype=torch.int32, device=out.device)
    shifted = torch.empty(min(step, n), 1, dtype=torch.int32, device=out.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        idx, exp = index[: stop - start], shifted[: stop - start]
        exp.copy_(flat_scales[start:stop]).bitwise_left_shift_(8)  # widened before the shift
        torch.add(flat_blocks[start:stop], exp, out=idx)
        torch.index_select(table, 0, idx.view(-1), out=flat_out[start:stop].view(-1))
    return out


def _check_parts(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4: blocks {blocks.dtype} and scales {scales.dtype} must be uint8")
    if blocks.dim() < 2 or blocks.shape[-1] != GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"mxfp4: blocks {tuple(blocks.shape)} must be scales' shape {tuple(scales.shape)} + "
            f"({GROUP // 2},)"
        )
    want = (*scales.shape[:-1], scales.shape[-1] * GROUP)
    if tuple(out.shape) != want or out.dtype not in OUT_DTYPES or not out.is_contiguous():
        raise ValueError(
            f"mxfp4: out is {tuple(out.shape)} {out.dtype}; must be a contiguous {want} tensor of "
            f"one of {OUT_DTYPES}"
        )
    if blocks.device != out.device or scales.device != out.device:
        raise ValueError(
            f"mxfp4: blocks ({blocks.device}), scales ({scales.device}) and out ({out.device}) "
            "must share a device"
        )


def dequantize_mxfp4_new(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The (R, C) weight of blocks (R, C / 32, 16) and scales (R, C / 32), in a new tensor."""
    out = torch.empty(
        (*scales.shape[:-1], scales.shape[-1] * GROUP), dtype=dtype, device=blocks.device
    )
    return dequantize_mxfp4(blocks, scales, out)
