"""Tier 1: a one-row layer of an int4, int8 or float model in two C++ calls
(`model/rowlayer.py`) against the one-row path's own operations (the compiled glue, the
products, `onequery`, the experts' `SwiGLU`), and a decode through it against the one-row
path's.

Only CPUs with AVX-512 BF16 run the int4 loops (`packed.cpu_supports`); elsewhere those cases
skip, and where the CPU has the instructions they fail if the code does not build."""

from __future__ import annotations

import ctypes
import itertools
import platform
import shutil
import subprocess

import pytest
import torch

import offload_rt
from offload_rt.config import QuantConfig
from offload_rt.engine import BatchDecoder
from offload_rt.experts.quant import dequantize, quantize
from offload_rt.grid import ExpertKey
from offload_rt.model import cpukernels, native, onequery, onerow, packed, rowlayer, rows, rowstep
from offload_rt.model.layers import linear
from offload_rt.tools.quantize import quantize_checkpoint
from tests.conftest import save_reference

PROMPT = [1, 17, 42, 99, 5]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}  # relative


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Mixtral whose widths int4's row loop reads (groups of 64, an even number a
    row), as saved (bfloat16 when loaded so) and with its experts quantized to int4 and int8."""
    folder = tmp_path_factory.mktemp("rowlayer")
    save_reference(
        folder / "float", hidden_size=128, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    quantize_checkpoint(folder / "float", folder / "int4", 4, 64, progress=False)
    quantize_checkpoint(folder / "float", folder / "int8", 8, 32, progress=False)
    return folder


@pytest.fixture(
    params=[
        "int4", "int4-float32", "int4-float16", "int8", "int8-bfloat16", "bfloat16", "float16",
        "float32",
    ]
)  # fmt: skip
def load(request, checkpoints):
    """Loads the model of one kind: experts and dense weights as int4 codes (`dense_quant`)
    with bfloat16 activations (`packed`'s loop), float32 or float16 ones (float32 lanes), as
    int8 codes with float32 or bfloat16 ones, or all of it in one float dtype."""
    kind, _, dtype = request.param.partition("-")
    if request.param == "int4" and not packed.cpu_supports():
        pytest.skip("int4's row loop for bfloat16 activations needs AVX-512 BF16")
    if kind in ("int4", "int8"):
        dtype = getattr(torch, dtype or ("bfloat16" if kind == "int4" else "float32"))
        return lambda: offload_rt.load(checkpoints / kind, dtype=dtype, dense_quant=kind)
    return lambda: offload_rt.load(checkpoints / "float", dtype=getattr(torch, kind))


def close(got: torch.Tensor, want: torch.Tensor, ulps: float) -> bool:
    """Within `ulps` ulps of want's dtype, relative to the larger of |want| and its rms (float32:
    16 times as many, its sums over a row in another order)."""
    ulps *= 16 if want.dtype == torch.float32 else 1
    scale = torch.maximum(want.float().abs(), want.float().pow(2).mean().sqrt())
    return bool(((got.float() - want.float()).abs() <= ulps * ULP[want.dtype] * scale).all())


@pytest.fixture
def glue_on_tiny_models(monkeypatch):
    """The one-row path and its int4 products (`packed`) for the tiny model too."""
    monkeypatch.setattr(onerow, "MIN_HIDDEN", 0)
    monkeypatch.setattr(cpukernels, "MIN_NUMEL", 0)


def test_a_layer_equals_the_one_row_paths_operations(load, glue_on_tiny_models):
    assert rowlayer.available()  # it builds where the CPU has the instructions
    gen = torch.Generator().manual_seed(0)
    with load() as model:
        dec, c = model.model, model.model.config
        lw, spec, eps = dec.weights.layers[0], dec.spec.attention, c.rms_norm_eps
        mlp = lw.mlp
        extras = (mlp.router_bias, mlp.correction, mlp.shared, mlp.shared_gate)
        dtype = dec.dtype
        plan = rowlayer.plan(
            lw.attn, spec, lw.input_norm, lw.post_attn_norm, mlp.router, dec.spec.router, extras,
            dtype,
        )  # fmt: skip
        assert plan is not None
        h = (torch.randn(1, 1, c.hidden_size, generator=gen) * 0.5).to(dtype)
        seen, pos = 6, torch.tensor([[6]])
        rope = dec.rope.at(pos, dtype)
        caches = [dec.new_cache(1, 16) for _ in range(2)]
        old = torch.randn(2, *caches[0].keys[0][:, :, :seen].shape, generator=gen).to(dtype)
        for cache in caches:
            cache.keys[0][:, :, :seen], cache.values[0][:, :, :seen] = old[0], old[1]
        # the one-row path's operations
        h1, a = onerow.enter(h, lw.input_norm, eps, None)
        qkv = linear(a, lw.attn.wqkv).view(-1)
        widths = [spec.heads * spec.head_dim, *[spec.kv_heads * spec.head_dim] * 2]
        heads = onequery.attend(*qkv.split(widths), rope, caches[0], 0, seen, seen + 1)
        o = linear(heads, lw.attn.wo)
        router = dec.spec.router
        want = onerow.leave(h1, o, None, lw.post_attn_norm, eps, mlp.router, router, None, None)
        # call 1
        step = rowlayer.Step(h, dec.spec.router.top_k)
        chosen = rowlayer.attend(
            step, plan, spec, rope, caches[1].keys[0], caches[1].values[0], seen,
            dec.spec.router, c.experts_per_layer, eps,
        )  # fmt: skip
        assert chosen == want[3]
        for which in ("keys", "values"):
            mine, theirs = getattr(caches[1], which)[0], getattr(caches[0], which)[0]
            assert torch.equal(mine[:, :, :seen], theirs[:, :, :seen])  # the rest untouched
            assert close(mine[:, :, seen], theirs[:, :, seen], 2)
        assert close(step.h, want[0].view(-1), 2) and close(step.m, want[1], 2)
        tol = 1e-5 if dtype == torch.float32 else 4 * ULP[dtype]
        torch.testing.assert_close(step.w, want[2], rtol=tol, atol=tol)
        # call 2: the chosen experts, as their SwiGLU computes them on the same input
        keys = [ExpertKey(0, e) for e in chosen]
        dec.backend.run({key: step.m for key in keys})  # loads them: resident from now on
        ffns = dec.backend.resident(keys)
        assert ffns is not None and rowlayer.experts(step, ffns)
        for j, ffn in enumerate(ffns):
            # codes: their group sums and the offsets' term cancel (each several times the
            # result), so float32 sums in two orders differ more (measured 20 ulps int8, 32 int4)
            ulps = 2 if isinstance(ffn.w13, torch.Tensor) else 4
            assert close(step.ys[j], ffn(step.m).view(-1), ulps)
        # lm_head by the same row loops (`product`), as `linear` computes it
        logits = rowlayer.product(step.m, dec.weights.lm_head)
        assert logits is not None and logits.shape == (1, c.vocab_size)
        assert close(logits, linear(step.m, dec.weights.lm_head), ulps)
        with pytest.raises(IndexError, match="does not fit a cache of 16 positions"):
            rowlayer.attend(
                step, plan, spec, rope, caches[1].keys[0], caches[1].values[0], 16,
                dec.spec.router, c.experts_per_layer, eps,
            )  # fmt: skip


def test_a_decode_through_it_follows_the_one_row_path(load, glue_on_tiny_models, monkeypatch):
    """Every layer of every decode step in C++, and the step logits the one-row path's to
    bfloat16 rounding carried through two layers (within 2 ulps of the largest logit; a model
    whose router sat near a tie could choose otherwise at a step: this one's does not)."""

    def steps(tokens: list[int]) -> torch.Tensor:
        with load() as model:
            dec = BatchDecoder(model.model, [PROMPT], len(PROMPT) + len(tokens))
            out = [dec.prefill()[0]] + [dec.step([t], [True])[0] for t in tokens[:-1]]
        return torch.stack(out).float()

    calls = []
    attend = rowlayer.attend
    monkeypatch.setattr(rowlayer, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))
    with load() as model:
        dtype = model.model.dtype
        tokens = model.generate(PROMPT, max_new_tokens=12, stop=[]).token_ids
        assert model.stats()["hits"] > 0  # the backend's lookups still count
    assert len(calls) == 2 * (len(tokens) - 1)  # two layers, every decode step
    native = steps(tokens)
    monkeypatch.setattr(rowlayer, "plan", lambda *a, **k: None)  # the one-row path
    one_row = steps(tokens)
    per_step = (native - one_row).abs().amax(-1) / one_row.abs().amax(-1)
    assert per_step[0] == 0  # the prompt: the batched path either way
    tol = 1e-5 if dtype == torch.float32 else 2 * ULP[dtype]
    # measured: int4 0.74% (bfloat16), 2.1e-6 (float32), 0.15% (float16); int8 2.4e-6
    # (float32) and 1.1% (bfloat16); bfloat16 0.93%, float16 0.098%, float32 5e-7 at most
    assert (per_step <= tol).all()


def test_a_whole_step_in_one_call_equals_the_layer_calls(load, glue_on_tiny_models, monkeypatch):
    """Once every expert is resident for good (the cache holds them all), a step is one call
    (`rowstep.token`): the same loops in the same order, so the same logits bit for bit, and
    the backend counts the same uses."""

    def decode() -> tuple[torch.Tensor, dict]:
        with load() as model:
            dec = model.model
            grid = dec.backend.grid
            x = torch.zeros(1, dec.config.hidden_size, dtype=dec.dtype)
            for layer in grid.layers:  # every expert loaded
                dec.backend.run({key: x for key in grid.layer_keys(layer)})
            decoder = BatchDecoder(dec, [PROMPT], len(PROMPT) + 12)
            out = [decoder.prefill()[0]]
            for _ in range(11):
                out.append(decoder.step([int(out[-1].argmax())], [True])[0])
            return torch.stack(out), model.stats()

    calls = []
    token = rowstep.token
    monkeypatch.setattr(rowstep, "token", lambda *a, **k: calls.append(1) or token(*a, **k))
    in_one, counts = decode()
    assert len(calls) == 11  # every decode step
    monkeypatch.setattr(rowstep.TokenTable, "build", classmethod(lambda *a, **k: None))
    per_layer, counts_per_layer = decode()
    assert len(calls) == 11
    assert torch.equal(in_one, per_layer)
    names = ("hits", "misses", "evictions", "bytes_loaded", "resident")
    assert [counts[n] for n in names] == [counts_per_layer[n] for n in names]
    assert counts["evictions"] == 0 and counts["hits"] >= 2 * 2 * 11


def _head_call(
    step: rowlayer.Step, norm: torch.Tensor, w: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """`rowstep.finish` through the head of `norm` and lm_head `w`: its argmax and logits, the
    logits checked against the row loops' product of the normed h."""
    head = rowstep.Head.build(norm, w, w.dtype)
    assert head is not None
    got = rowstep.finish(step, head, 1e-6)
    want = rowlayer.product(step.m, w)
    torch.testing.assert_close(got.logits.view(1, -1), want, rtol=0, atol=0, equal_nan=True)
    return got.best, got.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_heads_call_finds_the_logits_argmax_as_torch(dtype):
    """The head's call (`rowstep.finish`, as a one-call step ends) writes the logits and their
    argmax: torch.argmax's, the first of equal scores, the first NaN above all, over lengths
    shorter than, equal to and past its 16 lanes with a tail; the logits are lm_head's product
    with the normed h (the row loops, `rowlayer.product`)."""
    if not rowlayer.available():
        pytest.skip("the C++ layer does not build here")
    gen = torch.Generator().manual_seed(3)
    d = 64
    for vocab in (5, 16, 37, 1000):
        lm_head = torch.randn(vocab, d, generator=gen).to(dtype)
        norm = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
        h = torch.randn(1, d, generator=gen).to(dtype)
        step = rowlayer.Step(h, 2)

        found, logits = _head_call(step, norm, lm_head)
        assert found == int(torch.argmax(logits))
        top = int(torch.argmax(logits))
        # the best row copied before and after it, in one lane and in others: the first wins
        copies = {at for at in (1, 17, 33, vocab // 2, vocab - 1) if at < vocab} - {top}
        ties = lm_head.clone()
        for at in copies:
            ties[at] = lm_head[top]
        found, logits = _head_call(step, norm, ties)
        assert found == int(torch.argmax(logits)) == min(copies | {top})
        nans = lm_head.clone()  # NaN scores at two rows: the first of them
        nans[vocab - 2, 1] = nans[vocab // 3 + 1, 0] = float("nan")
        found, logits = _head_call(step, norm, nans)
        assert found == int(torch.argmax(logits)) == min(vocab - 2, vocab // 3 + 1)


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("g++") is None, reason="x86-64 and g++ only"
)
def test_the_row_loops_built_for_avx2_and_for_no_vector_isa_equal_float64(tmp_path):
    """Inductor builds the loops with -march=native, so an AVX-512 machine never compiles their
    AVX2 and generic-vector branches (most consumer desktops take the first): built here for
    x86-64-v3 and x86-64 and run through one product each (mode 4), float rows, int8 and int4
    codes, every activation dtype, against float64 within the output dtype's rounding."""
    ctype = {"int64_t": ctypes.c_int64, "float": ctypes.c_float}
    source = tmp_path / "rowlayer.cpp"
    source.write_text(rowlayer.SOURCE)
    gen = torch.Generator().manual_seed(0)
    n, k = 40, 256
    w = torch.randn(n, k, generator=gen) / 16
    for arch in ("x86-64-v3", "x86-64"):
        lib = tmp_path / f"rowlayer-{arch}.so"
        flags = ["-O1", "-shared", "-fPIC", "-std=c++20", "-fopenmp", f"-march={arch}"]
        subprocess.run(["g++", *flags, str(source), "-o", str(lib)], check=True, timeout=300)
        kernel = ctypes.CDLL(str(lib)).kernel
        kernel.argtypes = [ctype.get(t, ctypes.c_void_p) for t in rowlayer.ARGTYPES]
        for bits, dtype in itertools.product((0, 8, 4), ULP):
            x = torch.randn(1, k, generator=gen).to(dtype)
            if bits == 0:
                held, form, group = (w.to(dtype), None, None), rows.FLOAT, 0
                want = x.double() @ w.to(dtype).double().T
            else:
                quant = QuantConfig(bits, 32)
                q = quantize(w, quant)
                held, group = (q.qweight, q.scales, q.offsets), 32
                form = rows.INT8 if bits == 8 else rows.INT4
                want = x.double() @ dequantize(q, quant, torch.float64).T
            table = torch.tensor([t.data_ptr() if t is not None else 0 for t in held])
            got = torch.empty(1, n, dtype=dtype)
            kernel(
                4, x.data_ptr(), got.data_ptr(), None, 0, table.data_ptr(), None, None, 0, None,
                None, 0, 0, 0, 0, 0, k, n, 0, 0, group, form, 0.0, 0.0, 0.0, 0, 0.0, None, None,
                2, native.DTYPE_CODES[dtype], 0, 0, 0,
            )  # fmt: skip
            error = (got.double() - want).abs().max() / want.abs().max()
            assert error <= 2 * ULP[dtype] * 16, (arch, bits, dtype)
