"""Tier 1: the wire schema: round trips of every dtype and shape, and refusal of bad bytes."""

from __future__ import annotations

import random

import msgpack
import pytest
import torch

from offload_rt.distributed.frames import decode_groups, encode_groups, pack_groups
from offload_rt.distributed.wire import MAX_HEADER_BYTES, WIRE_VERSION, WireError
from offload_rt.model import ExpertKey

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COUNTS = [(3,), (1, 2, 5), (0,), (0, 0), (4, 0, 2), (1,) * 8]
KINDS = ["request", "response"]


def random_tensor(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaN and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def grouped(layer: int, counts: tuple[int, ...], tensor: torch.Tensor) -> dict:
    """`tensor` (N, D) cut into groups of `counts` rows, experts 1, 3, 5, ..."""
    parts = tensor.split(list(counts))
    return {ExpertKey(layer, 2 * i + 1): part for i, part in enumerate(parts)}


def request_groups(counts: tuple[int, ...] = (2, 3), d: int = 16, dtype=torch.float32) -> dict:
    return grouped(5, counts, random_tensor(sum(counts), d, dtype))


def round_trip(kind: str, groups: dict) -> dict:
    return decode_groups(kind, [encode_groups(kind, groups)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("d", [1, 16])
@pytest.mark.parametrize("kind", KINDS)
def test_groups_round_trip(kind, d, counts, dtype):
    groups = grouped(7, counts, random_tensor(sum(counts), d, dtype))
    out = round_trip(kind, groups)
    assert list(out) == list(groups)
    for key, t in groups.items():
        assert out[key].dtype == dtype and out[key].shape == t.shape
        assert torch.equal(bits(out[key]), bits(t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", [(3,), (2, 0, 1)])
def test_the_message_is_the_documented_header_then_the_groups_row_by_row(dtype, counts):
    groups = grouped(4, counts, random_tensor(sum(counts), 8, dtype))
    header = {
        "version": WIRE_VERSION,
        "kind": "response",
        "layer": 4,
        "experts": [k.expert for k in groups],
        "counts": list(counts),
        "transposed": [False] * len(counts),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [sum(counts), 8],
    }
    payload = b"".join(bits(t).numpy().tobytes() for t in groups.values())
    assert encode_groups("response", groups) == msgpack.packb(header) + payload


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_keep_their_bits(dtype):
    tensor = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0, 1e-3]], dtype=dtype)
    out = round_trip("response", {ExpertKey(0, 4): tensor})
    assert torch.equal(bits(out[ExpertKey(0, 4)]), bits(tensor))


def test_decoded_groups_own_writable_memory():
    groups = request_groups()
    data = bytearray(encode_groups("request", groups))
    out = decode_groups("request", [data])
    before = {k: t.clone() for k, t in out.items()}
    data[-8:] = b"\xff" * 8
    assert all(torch.equal(out[k], before[k]) for k in out)
    out[ExpertKey(5, 3)].add_(1)  # writable: no warning, no error


def test_a_group_in_neither_memory_order_is_sent_by_value():
    t = random_tensor(6, 8, torch.float32)[:, ::2]  # (6, 4), neither row- nor column-major
    assert not t.is_contiguous() and not t.T.is_contiguous()
    out = round_trip("request", {ExpertKey(0, 0): t[:2], ExpertKey(0, 1): t[2:]})
    assert torch.equal(out[ExpertKey(0, 0)], t[:2]) and torch.equal(out[ExpertKey(0, 1)], t[2:])


def test_groups_round_trip_in_ascending_expert_order():
    groups = {ExpertKey(3, 6): random_tensor(2, 8, torch.bfloat16, 1)}
    groups[ExpertKey(3, 1)] = random_tensor(0, 8, torch.bfloat16, 2)
    groups[ExpertKey(3, 4)] = random_tensor(3, 8, torch.bfloat16, 3)
    back = round_trip("request", groups)
    assert list(back) == sorted(groups)
    for key, t in groups.items():
        assert torch.equal(bits(back[key]), bits(t))
    response = round_trip("response", {k: v * 2 for k, v in back.items()})
    assert list(response) == sorted(groups)


@pytest.mark.parametrize(
    "groups, match",
    [
        ({ExpertKey(0, 1): torch.zeros(2, 4, dtype=torch.float64)}, "float64"),
        ({ExpertKey(0, 1): torch.zeros(2, 4, 1)}, r"\(n, D\)"),
        ({ExpertKey(-1, 1): torch.zeros(0, 4)}, "layer must be a non-negative integer"),
        ({ExpertKey(0, -2): torch.zeros(1, 4)}, "experts must be non-negative integers"),
    ],
)
def test_encode_refuses_groups_the_wire_cannot_carry(groups, match):
    with pytest.raises(WireError, match=match):
        encode_groups("request", groups)


def test_kinds_are_not_confused():
    request = encode_groups("request", request_groups())
    response = encode_groups("response", {ExpertKey(0, 1): torch.zeros(1, 2)})
    with pytest.raises(WireError, match="expected kind 'response', got 'request'"):
        decode_groups("response", [request])
    with pytest.raises(WireError, match="expected kind 'request', got 'response'"):
        decode_groups("request", [response])


# ---- untrusted bytes


def header_of(groups: dict) -> dict:
    return {
        "version": WIRE_VERSION,
        "kind": "request",
        "layer": 5,
        "experts": [k.expert for k in groups],
        "counts": [t.shape[0] for t in groups.values()],
        "transposed": [False] * len(groups),
        "dtype": "float32",
        "shape": [sum(t.shape[0] for t in groups.values()), 16],
    }


def craft(payload: bytes | None = None, **changes) -> bytes:
    """A request (counts (2, 3), D 16, float32) with header fields replaced or (None) removed."""
    groups = request_groups()
    header = {**header_of(groups), **changes}
    header = {k: v for k, v in header.items() if v is not None}
    body = b"".join(t.numpy().tobytes() for t in groups.values()) if payload is None else payload
    return msgpack.packb(header) + body


VALID = encode_groups("request", request_groups())
HEADER_LEN = len(msgpack.packb(header_of(request_groups())))
CORRUPTIONS = {
    # truncations anywhere: in the header, at its end, in the payload
    **{f"truncated at {n}": (VALID[:n], "truncated") for n in (0, 1, 2, 9, 30, HEADER_LEN - 1)},
    **{f"truncated at header+{n}": (VALID[: HEADER_LEN + n], "payload truncated") for n in (0, 3)},
    "one byte short": (
        VALID[:-1],
        r"payload truncated: 319 bytes, but shape \[5, 16\] of float32 needs 320",
    ),
    "one byte over": (VALID + b"\0", "payload oversized: 321 bytes"),
    "version 1": (craft(version=1), "wire version 1 is not supported; this runtime speaks 2"),
    "version as bool": (craft(version=True), "wire version True"),
    "version as str": (craft(version="1"), "wire version '1'"),
    "no version": (craft(version=None), "no 'version' field"),
    "unknown kind": (craft(kind="shutdown"), "kind 'shutdown' is not one of"),
    "dtype float64": (craft(dtype="float64"), "dtype 'float64' is not one of"),
    "dtype a list": (craft(dtype=["float32"]), r"dtype \['float32'\]"),
    "no dtype": (craft(dtype=None), "no 'dtype' field"),
    "counts short of N": (craft(counts=[2, 2]), r"counts \[2, 2\] sum to 4, but the tensor has 5"),
    "negative count": (craft(counts=[-1, 6]), "counts must be a list of non-negative integers"),
    "counts not a list": (craft(counts=5), "counts must be a list"),
    "experts and counts differ": (craft(counts=[5], transposed=[False]), "2 experts but 1 counts"),
    "no transposed": (craft(transposed=None), "no 'transposed' field"),
    "transposed as ints": (craft(transposed=[0, 1]), "transposed must be a list of booleans"),
    "transposed short": (craft(transposed=[True]), "2 groups but 1 transposed flags"),
    "repeated expert": (craft(experts=[1, 1]), r"expert ids repeat: \[1, 1\]"),
    "negative layer": (craft(layer=-3), "layer must be a non-negative integer, got -3"),
    "no layer": (craft(layer=None), "no 'layer' field"),
    "3-d shape": (craft(shape=[5, 4, 4]), r"must be \(N, D\), got shape \[5, 4, 4\]"),
    "huge declared shape": (
        craft(shape=[2**39, 2**39], counts=[2**39, 0]),
        "payload truncated: 320 bytes, but shape",
    ),
    "dimension over bound": (craft(shape=[5, 2**60]), "sizes of at most"),
    "header not a map": (
        msgpack.packb([1, "request"]) + b"\0" * 8,
        "header must be a map, got list",
    ),
    "header a bare int": (b"\x00" * 40, "header must be a map, got int"),
    "header nil": (b"\xc0" + b"\x00" * 40, "header must be a map, got NoneType"),
    "long string": (craft(kind="x" * 1000), "within the wire's bounds"),
    "binary field": (craft(dtype=b"float32"), "within the wire's bounds"),
    "ext type": (craft(layer=msgpack.ExtType(5, b"xyz")), "within the wire's bounds"),
    "too many experts": (craft(experts=list(range(5000))), "within the wire's bounds"),
    "header over the size bound": (
        craft(**{f"pad{i}": list(range(4000, 8000)) for i in range(8)}),
        f"header truncated or over {MAX_HEADER_BYTES} bytes",
    ),
    "deep nesting": (b"\x91" * 10_000 + b"\x00", "within the wire's bounds|must be a map"),
    "invalid utf-8": (b"\x81\xa2\xff\xfe\x01", "within the wire's bounds"),
}


@pytest.mark.parametrize("data, match", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_bytes_raise_wire_error(data, match):
    with pytest.raises(WireError, match=match):
        decode_groups("request", [data])


def test_random_bytes_and_mutations_never_escape_as_other_errors():
    rng = random.Random(0)
    samples = [rng.randbytes(rng.randrange(0, 200)) for _ in range(300)]
    for _ in range(300):
        data = bytearray(VALID)
        data[rng.randrange(HEADER_LEN)] = rng.randrange(256)
        samples.append(bytes(data))
    for data in samples:
        try:
            groups = decode_groups("request", [data])
        except WireError:
            continue
        # whatever decodes is consistent: (n, D) groups of one D and dtype
        assert len({(t.dim(), t.shape[1], t.dtype) for t in groups.values()}) == 1


def some_groups(counts: tuple[int, ...], dtype: torch.dtype, d: int = 16) -> dict:
    gen = torch.Generator().manual_seed(sum(counts))
    return {
        ExpertKey(2, e): torch.randn(n, d, generator=gen).to(dtype)
        for e, n in zip((6, 1, 4), counts)
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_groups_travel_transposed(dtype):
    # experts' outputs of 4+ rows are transposed views (model.layers.linear): their bytes go
    # as they lie in memory, and come back as transposed views of the same values
    gen = torch.Generator().manual_seed(0)
    groups = {
        ExpertKey(0, e): torch.randn(5, n, generator=gen).to(dtype).T
        for e, n in enumerate((6, 0, 4, 1))
    }
    groups[ExpertKey(0, 9)] = torch.randn(3, 5, generator=gen).to(dtype)  # row-major
    msg = encode_groups("response", groups)
    out = decode_groups("response", [msg])
    assert all(torch.equal(bits(out[k]), bits(t)) for k, t in groups.items())
    assert out[ExpertKey(0, 0)].stride() == (1, 6) and out[ExpertKey(0, 9)].is_contiguous()
    assert msg.endswith(bits(groups[ExpertKey(0, 9)]).numpy().tobytes())  # last, row by row
    # the payload: each group in ascending order, the transposed ones as their transposes
    payload = b"".join(bits(groups[k].T if k.expert < 9 else groups[k]).numpy().tobytes()
                       for k in sorted(groups))  # fmt: skip
    assert msg.endswith(payload)
    assert msgpack.unpackb(msg[: len(msg) - len(payload)])["shape"] == [14, 5]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_cut_the_message_and_decode_back(n, dtype):
    groups = some_groups((2, 0, 3), dtype)
    packed = pack_groups("request", groups)
    frames = packed.frames(n)
    whole = encode_groups("request", groups)
    assert len(frames) == n and b"".join(frames) == whole and packed.nbytes == len(whole)
    assert all(type(f) is bytes for f in frames)  # Ray passes bytes without pickling
    assert max(map(len, frames)) == -(-len(whole) // n)  # none over its share: Ray's limit
    back = decode_groups("request", frames)
    assert list(back) == sorted(groups)
    assert all(torch.equal(bits(back[k]), bits(groups[k])) for k in groups)
    back[ExpertKey(2, 4)].add_(1)  # owns writable memory


def test_decode_groups_refuses_bad_frames():
    frames = pack_groups("request", some_groups((2, 3), torch.float32)).frames(4)
    with pytest.raises(WireError, match="expected kind 'response', got 'request'"):
        decode_groups("response", frames)
    with pytest.raises(WireError, match="payload truncated"):
        decode_groups("request", frames[:-1])
    with pytest.raises(WireError, match="payload oversized"):
        decode_groups("request", [*frames, b"\0"])
    with pytest.raises(WireError, match="header truncated"):
        decode_groups("request", [frames[0][:5], b"", frames[0][5:9]])
    with pytest.raises(WireError, match="header truncated"):
        decode_groups("request", [])
    assert decode_groups("request", [frames[0][:5], b"", frames[0][5:], *frames[1:]]).keys() == {
        ExpertKey(2, 1),
        ExpertKey(2, 6),
    }


def test_encode_groups_refuses_what_cannot_be_sent():
    x = torch.zeros(1, 4)
    with pytest.raises(WireError, match="at least one expert"):
        encode_groups("request", {})
    with pytest.raises(WireError, match="span layers"):
        encode_groups("request", {ExpertKey(0, 1): x, ExpertKey(1, 1): x})
    with pytest.raises(WireError, match="kind"):
        encode_groups("tensor", {ExpertKey(0, 1): x})
    with pytest.raises(WireError, match="one D"):
        encode_groups("request", {ExpertKey(0, 1): x, ExpertKey(0, 2): torch.zeros(1, 5)})
    with pytest.raises(WireError, match="dtypes"):
        encode_groups("request", {ExpertKey(0, 1): x, ExpertKey(0, 2): x.double()})
