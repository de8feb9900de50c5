"""Tier 1: the compiled CPU matrix-vector kernels (`model/cpukernels.py`) against float64
products of the same weights, the affine int8/int4 kernels against dequantize-then-multiply,
the eager fallback, and the kernels built for AVX2 and for no vector ISA at all."""

from __future__ import annotations

import os
import subprocess
import sys
from subprocess import PIPE

import pytest
import torch
import torch.nn.functional as F

import offload_rt
from offload_rt.config import QuantConfig
from offload_rt.experts.mxfp4 import dequantize_mxfp4_new, quantize_mxfp4
from offload_rt.experts.quant import ExpertCodec, QuantMatrix, dequantize, quantize
from offload_rt.model import cpukernels, packed
from offload_rt.model.layers import linear

# float32 sums of 256-1024 products in another order: a few ulps of the output's scale;
# bfloat16 and float16 round the output itself (8 and 11 significant bits)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture
def kernels_on_small_shapes(monkeypatch):
    monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    monkeypatch.delenv(cpukernels.ENV, raising=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_gemv_equals_the_float64_product(kernels_on_small_shapes, monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(cpukernels, "_eager_as_fast", lambda dtype: False)  # the kernel itself
    torch.manual_seed(0)
    w = (torch.randn(96, 512, generator=gen) / 16).to(dtype)
    x = torch.randn(1, 512, generator=gen).to(dtype)
    got = cpukernels.gemv(x, w)
    assert got is not None and got.dtype == dtype and got.shape == (1, 96)
    want = F.linear(x.double(), w.double())
    assert relative_error(got, want) <= TOLERANCE[dtype]
    # the same call through `linear`, with a bias and a (1, 1, K) input as attention sends
    b = torch.randn(96, generator=gen).to(dtype)
    through = linear(x.view(1, 1, 512), w, b)
    assert through.shape == (1, 1, 96) and torch.equal(through[0], got + b)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_gemv_equals_dequantize_then_multiply(kernels_on_small_shapes, bits, dtype):
    gen = torch.Generator().manual_seed(0)
    quant = QuantConfig(bits, 64)
    q = quantize(torch.randn(80, 512, generator=gen) / 16, quant)
    x = torch.randn(1, 512, generator=gen).to(dtype)
    got = cpukernels.affine_gemv(x, q.qweight, q.scales, q.offsets, bits)
    assert got is not None and got.dtype == dtype
    want = F.linear(x.double(), dequantize(q, quant, torch.float64))
    assert relative_error(got, want) <= TOLERANCE[dtype]


# the last: 44 groups a half (the loop widens scales 16 groups at a time: two whole chunks and
# a part)
@pytest.mark.parametrize(
    "rows, group, k", [(81, 32, 1024), (80, 64, 1024), (33, 128, 1024), (17, 32, 2816)]
)
def test_int4_bfloat16_kernel_equals_dequantize_then_multiply(
    kernels_on_small_shapes, monkeypatch, rows, group, k
):
    """The hand-written int4 product for bfloat16 activations (`model/packed.py`) where the
    CPU has AVX-512 BF16: its float32 sums equal the float64 product before the output's
    bfloat16 rounding; the generated kernel agrees with it to that rounding."""
    if not packed.cpu_supports():
        pytest.skip("no AVX-512 BF16 here: the generated kernel serves (tested above)")
    assert packed.available()  # it builds where the CPU has the instructions
    gen = torch.Generator().manual_seed(1)
    quant = QuantConfig(4, group)
    q = quantize(torch.randn(rows, k, generator=gen) / 16, quant)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    assert packed.applies(x, q.scales) and not packed.applies(x.float(), q.scales)
    got = packed.affine4_gemv(x, q.qweight, q.scales, q.offsets)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (1, rows)
    want = F.linear(x.double(), dequantize(q, quant, torch.float64))
    # float32 sums, then one rounding to bfloat16 (half an ulp: 2^-9 of each output)
    assert ((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()
    assert torch.equal(cpukernels.affine_gemv(x, q.qweight, q.scales, q.offsets, 4), got)
    monkeypatch.setenv(packed.ENV, "0")
    assert not packed.applies(x, q.scales)
    generated = cpukernels.affine_gemv(x, q.qweight, q.scales, q.offsets, 4)
    assert generated is not None
    assert relative_error(generated, got.double()) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_gemv_equals_dequantize_then_multiply(kernels_on_small_shapes, dtype):
    gen = torch.Generator().manual_seed(0)
    blocks, scales = quantize_mxfp4(torch.randn(80, 512, generator=gen) / 16)
    scales[0, 0], blocks[1, 2] = 0, 0x8F  # 2^-127 (subnormal in float32); -0 beside -6
    x = torch.randn(1, 512, generator=gen).to(dtype)
    got = cpukernels.mxfp4_gemv(x, blocks, scales)
    assert got is not None and got.dtype == dtype
    want = F.linear(x.double(), dequantize_mxfp4_new(blocks, scales, torch.float32).double())
    assert relative_error(got, want) <= TOLERANCE[dtype]


def test_fp8_gemv_equals_dequantize_then_multiply(kernels_on_small_shapes):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=gen) * 40).to(torch.float8_e4m3fn)
    # blocks of 16 rows and 128 columns
    scale_inv = torch.rand(64 // 16, 256 // 128, generator=gen) + 0.5
    x = torch.randn(1, 256, generator=gen)
    got = cpukernels.fp8_gemv(x, w, scale_inv)
    assert got is not None
    dense = w.double() * scale_inv.double().repeat_interleave(16, 0).repeat_interleave(128, 1)
    assert relative_error(got, F.linear(x.double(), dense)) <= TOLERANCE[torch.float32]


def test_an_odd_number_of_int4_groups_is_left_to_the_eager_path(kernels_on_small_shapes):
    gen = torch.Generator().manual_seed(0)
    quant = QuantConfig(4, 32)
    # 3 groups: one would span both nibbles
    q = quantize(torch.randn(16, 96, generator=gen) / 16, quant)
    x = torch.randn(1, 96, generator=gen)
    assert cpukernels.affine_gemv(x, q.qweight, q.scales, q.offsets, 4) is None


@pytest.mark.parametrize("bits", [8, 4])
def test_a_packed_expert_computes_from_its_codes_as_the_dequantized_one(
    kernels_on_small_shapes, bits
):
    gen = torch.Generator().manual_seed(0)
    d, f = 128, 192
    quant = QuantConfig(bits, 32)
    codec = ExpertCodec(d, f, quant, torch.device("cpu"), torch.float32)
    parts = {}
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        q = quantize(torch.randn(shape, generator=gen) / 16, quant)
        parts |= {f"{name}.qweight": q.qweight, f"{name}.scales": q.scales}
        parts[f"{name}.offsets"] = q.offsets
    buf = torch.empty(codec.nbytes, dtype=torch.uint8)
    codec.pack(parts, buf)
    views = codec.views(buf)
    ffn = codec.ffn(views)
    assert isinstance(ffn.w13, QuantMatrix)
    w13, w2 = codec.expand(views, "w13").double(), codec.expand(views, "w2").double()

    def reference(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x.double(), w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    one, many = torch.randn(1, d, generator=gen), torch.randn(5, d, generator=gen)
    assert relative_error(ffn(one), reference(one)) <= 1e-5
    assert relative_error(ffn(many), reference(many)) <= 1e-5  # more rows: the scratch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_whose_eager_kernel_is_as_fast_keep_it(kernels_on_small_shapes, dtype):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 512, generator=gen) / 16).to(dtype)
    x = torch.randn(1, 512, generator=gen).to(dtype)
    eager = dtype in cpukernels.EAGER_AS_FAST.get(torch.backends.cpu.get_cpu_capability(), ())
    assert (cpukernels.gemv(x, w) is None) == eager
    if eager:
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_kernels_off_leaves_torchs_own_products(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)
    monkeypatch.setenv(cpukernels.ENV, "0")
    w, x = torch.randn(96, 512, generator=gen), torch.randn(1, 512, generator=gen)
    assert cpukernels.gemv(x, w) is None
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_small_products_keep_torchs_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.delenv(cpukernels.ENV, raising=False)
    w, x = torch.randn(96, 512, generator=gen), torch.randn(1, 512, generator=gen)
    assert w.numel() < cpukernels.MIN_NUMEL
    assert cpukernels.gemv(x, w) is None


CHILD = """
import torch, torch.nn.functional as F
from torch._inductor import cpu_vec_isa
from offload_rt.config import QuantConfig
from offload_rt.experts.mxfp4 import dequantize_mxfp4_new, quantize_mxfp4
from offload_rt.experts.quant import dequantize, quantize
from offload_rt.model import cpukernels
cpukernels.MIN_NUMEL = 0
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
w, x = torch.randn(64, 256, generator=gen) / 16, torch.randn(1, 256, generator=gen)
q = quantize(w, QuantConfig(4, 32))
got = [cpukernels.gemv(x, w), cpukernels.affine_gemv(x, q.qweight, q.scales, q.offsets, 4)]
want = [F.linear(x.double(), w.double()),
        F.linear(x.double(), dequantize(q, QuantConfig(4, 32), torch.float64))]
err = max(((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, want))
from offload_rt.model import packed
isa = cpu_vec_isa.pick_vec_isa()
hand = packed.applies(x.bfloat16(), q.scales)  # AVX-512 BF16 only: never below AVX-512
print(str(isa) if isa else "none", hand, err, cpukernels.COMPILED.failed)
"""


def test_kernels_built_for_avx2_and_for_no_vector_isa():
    """A CPU without AVX-512 (most desktops) gets kernels for what it has: forced here, in two
    children that build at once (torch reads the capability at import)."""
    children = {}
    for capability, isa in (("avx2", "avx2"), ("default", "none")):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        env.pop(cpukernels.ENV, None)
        argv = [sys.executable, "-c", CHILD]
        children[isa] = subprocess.Popen(argv, env=env, stdout=PIPE, stderr=PIPE, text=True)
    for isa, child in children.items():
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        picked, hand, error, failed = out.split()[-4:]
        assert (picked, failed) == (isa, "None") and float(error) <= 2e-6, out
        assert hand == "False", out  # the generated int4 kernel, for every dtype


def test_decode_steps_through_the_kernels_equal_transformers(kernels_on_small_shapes, reference):
    """Every one-row product of a decode step (attention, experts, lm_head) compiled: the step
    logits still equal transformers' within 1e-4, and the greedy tokens its tokens."""
    from offload_rt.engine import BatchDecoder
    from tests.test_exactness import PROMPTS, reference_greedy

    folder, hf = reference
    prompt = PROMPTS[0]
    with offload_rt.load(folder) as model:
        greedy = model.generate(prompt, max_new_tokens=12, stop=[]).token_ids
        decoder = BatchDecoder(model.model, [prompt], len(prompt) + len(greedy))
        steps = [decoder.prefill()[0]] + [decoder.step([t], [True])[0] for t in greedy[:-1]]
    assert len(cpukernels.COMPILED.kernels) > 0 and cpukernels.COMPILED.failed is None
    with torch.no_grad():
        want = hf(torch.tensor([prompt + greedy[:-1]])).logits[0, len(prompt) - 1 :]
    assert (torch.stack(steps) - want).abs().max().item() <= 1e-4
    assert greedy == reference_greedy(hf, prompt, 12)
