"""Group-wise int8 / int4 expert weights: quantization, int4 packing, and dequantization on use;
and the codec that packs an expert of any quantized scheme (these, or MXFP4 of `mxfp4.py`)
into one buffer and dequantizes it on use.

The format (`quantization_config` version 1 in config.json), for one weight W (out, in) of an
expert, groups of G consecutive input columns of a row:

    W[o, j] ≈ offsets[o, g] + qweight[o, j] · scales[o, g],      g = j // G
    offsets: the group's minimum rounded down to float16            (out, in / G) float16
    scales:  (max − offset) / (2^bits − 1) rounded up to float16    (out, in / G) float16
    codes:   round((W − offset) / scale), in 0 .. 2^bits − 1
    8 bits: qweight (out, in) uint8, one code per byte
    4 bits: qweight (out, in / 2) uint8; byte j of a row holds column j in its low nibble and
            column j + in/2 in its high nibble (the row's two halves, not neighbours, so that
            unpacking writes two contiguous runs)

Because the offset is rounded down and the scale up, the grid covers the whole group and no code
is clamped: |W − Ŵ| ≤ scale / 2. Asymmetric (an offset per group, not only a scale) because a
group's minimum and maximum differ in size: a symmetric grid spans ±max|w| and leaves part of
its codes unused on the smaller side, which at 16 levels costs accuracy that the 2 bytes of an
offset per group (0.25 bits per weight at G = 64) buy back. The offset is kept in weight units
(as MLX's `biases`), not as an integer zero point, so the group's minimum lies on the grid and
dequantization is one multiply and one add.

On the device an expert's parts sit in one packed uint8 buffer (`ExpertCodec`), so a move is one
copy of the quantized bytes; `ExpertCodec.dequantize` expands a slot into float scratch matrices
allocated once, right before the expert FFN uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from offload_rt.config import ClampedSwiGLUConfig, QuantConfig
from offload_rt.experts.mxfp4 import dequantize_mxfp4
from offload_rt.model.cpukernels import affine_gemv, fp8_gemv, mxfp4_gemv
from offload_rt.model.ffn import ClampedSwiGLU, ExpertFFN, SwiGLU
from offload_rt.model.layers import linear

F16 = torch.float16


@dataclass(frozen=True)
class QuantizedTensor:
    qweight: torch.Tensor  # (out, in) uint8 at 8 bits; (out, in / 2) at 4 bits
    scales: torch.Tensor  # (out, in / G) float16
    offsets: torch.Tensor  # (out, in / G) float16


def quantize(w: torch.Tensor, quant: QuantConfig, name: str = "weight") -> QuantizedTensor:
    """w (out, in) of any float dtype -> codes, scales and offsets of the format above.
    `name` labels errors (the checkpoint tensor being quantized)."""
    rows, cols = w.shape
    if cols % quant.group_size:
        raise ValueError(
            f"{name}: group size {quant.group_size} does not divide its {cols} input columns"
        )
    x = w.float().reshape(rows, cols // quant.group_size, quant.group_size)  # (out, n, G)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)  # (out, n); nan propagates into both
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"{name}: holds inf or nan; it cannot be quantized")
    levels = 2**quant.bits - 1
    offsets = _round_to_f16(lo, down=True)
    scales = _round_to_f16((hi - offsets.float()) / levels, down=False)
    if not (torch.isfinite(offsets).all() and torch.isfinite(scales).all()):
        raise ValueError(f"{name}: values beyond float16's range; its groups cannot be stored")
    step = torch.where(scales > 0, scales.float(), 1.0)  # a constant group: every code 0
    codes = torch.round((x - offsets.float()[..., None]) / step[..., None])
    codes = codes.clamp_(0, levels).to(torch.uint8).reshape(rows, cols)
    qweight = pack_int4(codes) if quant.bits == 4 else codes
    return QuantizedTensor(qweight, scales, offsets)


def _round_to_f16(x: torch.Tensor, down: bool) -> torch.Tensor:
    """float32 -> float16, rounded towards -inf (down) or +inf, never to nearest."""
    h = x.to(F16)
    wrong = h.float() > x if down else h.float() < x
    toward = torch.full_like(h, float("-inf") if down else float("inf"))
    return torch.where(wrong, torch.nextafter(h, toward), h)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) uint8 codes < 16 -> (rows, cols / 2): the row's first half in the low
    nibbles, its second half in the high nibbles."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, cols / 2) -> (rows, cols) uint8 codes, into `out` when given."""
    rows, half = packed.shape
    if out is None:
        out = torch.empty(rows, 2 * half, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=out[:, :half])
    torch.bitwise_right_shift(packed, 4, out=out[:, half:])
    return out


def dequantize(
    q: QuantizedTensor, quant: QuantConfig, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (out, in) weight the codes stand for, in a new tensor of `dtype`."""
    codes = unpack_int4(q.qweight) if quant.bits == 4 else q.qweight
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    _expand(codes, q.scales, q.offsets, out)
    return out


def _expand(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor
) -> None:
    """out (out, in) = offsets + codes · scales per group, in place: no allocation. The float16
    scales are widened inside the ops, so a float32 `out` gets q·s exactly and one rounding."""
    rows, groups = scales.shape
    grouped = out.view(rows, groups, -1)  # (out, n, G)
    out.copy_(codes)
    grouped.mul_(scales[..., None])
    grouped.add_(offsets[..., None])


def _expand_blocks(w: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor) -> None:
    """out (R, C) = fp8 w · its block's scale, in place (whole blocks: `check_widths`)."""
    rb, cb = out.shape[0] // scale_inv.shape[0], out.shape[1] // scale_inv.shape[1]
    out.copy_(w)
    out.view(scale_inv.shape[0], rb, scale_inv.shape[1], cb).mul_(scale_inv[:, None, :, None])


@dataclass(frozen=True)
class _Part:
    start: int  # byte offset in the packed buffer
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.start : self.start + self.nbytes].view(self.dtype).view(self.shape)


# each scheme's stored parts of one weight, in buffer order (wider elements first, for alignment)
SCHEME_PARTS = {
    "affine": {"scales": F16, "offsets": F16, "qweight": torch.uint8},
    "mxfp4": {"scales": torch.uint8, "blocks": torch.uint8},
    "fp8": {"weight_scale_inv": torch.float32, "weight": torch.float8_e4m3fn},
}


def _part_shape(quant: QuantConfig, part: str, rows: int, cols: int) -> tuple[int, ...]:
    if part in ("qweight", "weight"):
        return quant.codes_shape(rows, cols)
    if part == "blocks":  # MXFP4's codes, as the release stores them: 16 bytes a group of 32
        return rows, cols // quant.group_size, quant.group_size // 2
    return quant.groups_shape(rows, cols)


class _Layout:
    """Where each part of w13 = [w1; w3] (2F, D) and w2 (D, F) sits in the packed uint8 buffer:
    biases first (GPT-OSS's, in the compute dtype), then the scheme's parts, wider elements
    first so that every part is aligned when the slot start is."""

    def __init__(
        self, hidden: int, intermediate: int, quant: QuantConfig, bias_dtype: torch.dtype | None
    ) -> None:
        f, d = intermediate, hidden
        self.matrices = {"w13": (2 * f, d), "w2": (d, f)}
        self.parts: dict[tuple[str, str], _Part] = {}
        start = 0
        order: list[tuple[str, str, tuple[int, ...], torch.dtype]] = []
        if bias_dtype is not None:
            order += [("w13", "bias", (2 * f,), bias_dtype), ("w2", "bias", (d,), bias_dtype)]
        for part, dtype in SCHEME_PARTS[quant.scheme].items():
            for m, (rows, cols) in self.matrices.items():
                order.append((m, part, _part_shape(quant, part, rows, cols), dtype))
        for m, part, shape, dtype in order:
            self.parts[(m, part)] = _Part(start, shape, dtype)
            start += self.parts[(m, part)].nbytes
        self.nbytes = -(-start // 8) * 8  # keeps the next slot's wider parts aligned


class ExpertCodec:
    """One store's quantized experts: packing a checkpoint's parts into a slot's bytes, and
    dequantizing a slot into float scratch (w13 (2F, D), w2 (D, F)) reused by every call."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        quant: QuantConfig,
        device: torch.device,
        dtype: torch.dtype,
        clamped: ClampedSwiGLUConfig | None = None,
    ) -> None:
        self.quant, self.clamped, self.dtype, self.device = quant, clamped, dtype, device
        self.hidden, self.intermediate = hidden, intermediate
        self.layout = _Layout(hidden, intermediate, quant, None if clamped is None else dtype)
        self.nbytes = self.layout.nbytes
        shapes = self.layout.matrices
        self._scratch = {m: torch.empty(s, dtype=dtype, device=device) for m, s in shapes.items()}
        self._codes = (
            {m: torch.empty(s, dtype=torch.uint8, device=device) for m, s in shapes.items()}
            if quant.scheme == "affine" and quant.bits == 4
            else {}
        )

    def on(self, device: torch.device) -> ExpertCodec:
        """The same codec computing on `device`, with scratch of its own."""
        d, f = self.hidden, self.intermediate
        return ExpertCodec(d, f, self.quant, device, self.dtype, self.clamped)

    def views(self, buf: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """Each part of the expert packed in `buf` (nbytes,) uint8, as a typed view."""
        return {key: part.view(buf) for key, part in self.layout.parts.items()}

    def pack(self, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """Copy a checkpoint expert's logical parts ("gate.qweight", "gate_bias", ...) into
        `out` (nbytes,) uint8: the bytes as stored, gate's rows above up's."""
        for (m, part), view in self.views(out).items():
            if part == "bias":
                names = ["down_bias"] if m == "w2" else ["gate_bias", "up_bias"]
            else:
                names = [f"down.{part}"] if m == "w2" else [f"gate.{part}", f"up.{part}"]
            rows = view.shape[0] // len(names)
            for i, name in enumerate(names):
                view[i * rows : (i + 1) * rows].copy_(tensors[name].reshape(view[:rows].shape))

    def expand(self, views: Mapping[tuple[str, str], torch.Tensor], m: str) -> torch.Tensor:
        """Matrix `m` ("w13" or "w2") of the slot in the compute dtype, in the codec's scratch:
        valid until the next call, so one thread computes with it at a time."""
        out = self._scratch[m]
        if self.quant.scheme == "mxfp4":
            return dequantize_mxfp4(views[(m, "blocks")], views[(m, "scales")], out)
        if self.quant.scheme == "fp8":
            _expand_blocks(views[(m, "weight")], views[(m, "weight_scale_inv")], out)
            return out
        codes = views[(m, "qweight")]
        if self.quant.bits == 4:
            codes = unpack_int4(codes, self._codes[m])
        _expand(codes, views[(m, "scales")], views[(m, "offsets")], out)
        return out

    def ffn(self, views: Mapping[tuple[str, str], torch.Tensor]) -> ExpertFFN:
        """The slot's expert ready to compute: on the CPU its codes stay packed (`QuantMatrix`);
        elsewhere it is dequantized (valid until the next call)."""
        if self.device.type != "cpu":
            return self.dequantize(views)
        return self._expert(*(QuantMatrix(self, views, m) for m in ("w13", "w2")), views)

    def dequantize(self, views: Mapping[tuple[str, str], torch.Tensor]) -> ExpertFFN:
        """The slot's expert with its matrices expanded into the codec's scratch: valid until
        the next call, so one thread computes with them at a time."""
        return self._expert(self.expand(views, "w13"), self.expand(views, "w2"), views)

    def _expert(
        self,
        w13: torch.Tensor | QuantMatrix,
        w2: torch.Tensor | QuantMatrix,
        views: Mapping[tuple[str, str], torch.Tensor],
    ) -> ExpertFFN:
        if self.clamped is None:
            return SwiGLU(w13, w2)  # type: ignore[arg-type]
        c = self.clamped
        b13, b2 = views[("w13", "bias")], views[("w2", "bias")]
        return ClampedSwiGLU(w13, b13, w2, b2, c.limit, c.alpha)  # type: ignore[arg-type]


class QuantMatrix:
    """One quantized matrix of a slot, multiplied straight from its codes: one row through the
    compiled kernel of `model/cpukernels.py` for its scheme, more rows (or where no kernel
    applies) expanded into the codec's scratch first."""

    def __init__(
        self, codec: ExpertCodec, views: Mapping[tuple[str, str], torch.Tensor], m: str
    ) -> None:
        self.codec, self.views, self.m = codec, views, m
        self.shape = torch.Size(codec.layout.matrices[m])
        self.dtype, self.device = codec.dtype, codec.device
        self._part = {p: v for (name, p), v in views.items() if name == m}

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = self._packed(x)
        return linear(x, self.codec.expand(self.views, self.m)) if y is None else y

    def affine(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        quant = self.codec.quant
        if quant.scheme != "affine":
            return None
        part = self._part
        return quant.bits, part["qweight"], part["scales"], part["offsets"]

    def _packed(self, x: torch.Tensor) -> torch.Tensor | None:
        part = self._part
        scheme = self.codec.quant.scheme
        if scheme == "mxfp4":
            return mxfp4_gemv(x, part["blocks"], part["scales"])
        if scheme == "fp8":
            return fp8_gemv(x, part["weight"], part["weight_scale_inv"])
        bits = self.codec.quant.bits
        return affine_gemv(x, part["qweight"], part["scales"], part["offsets"], bits)
